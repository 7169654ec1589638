"""Per-step sampling time of SuTI Apply relative to the unpatched model, measured in the same run.

A random UNet in ComfyUI's SD1.5 (or SD2.x / SDXL) layout (tests/comfy_helpers.py) is sampled through
comfy.sample (the stock KSampler path) as: base, the shipped setting (adapter, demos once, `cond only`),
the adapter on cond and uncond, demos re-encoded every step, and training-free. Repeats are interleaved so
background load hits every variant alike; the table gives the median s/step and its ratio to base, the
process's peak memory after the base runs and after all variants, and the demo features' bytes per demo.

    .venv/bin/python -m benchmarks.step_time                                  # tiny widths, 16x16 latent
    .venv/bin/python -m benchmarks.step_time --full-width --latent 64 --steps 4 --repeats 1 --per-call   # SD1.5 at 512²
    .venv/bin/python -m benchmarks.step_time --mask-coverage 0.3    # demos with subject masks (30% of each)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_helpers as ch
import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ch.ARCHS, default="sd15", help="ComfyUI layout of the UNet")
    parser.add_argument("--full-width", action="store_true", help="the real model's widths (random weights)")
    parser.add_argument("--steps", type=int, default=8, help="sampler steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--demos", type=int, default=3, help="number of demonstrations")
    parser.add_argument("--latent", type=int, default=ch.LATENT_SIZE, help="latent side (demos use the same)")
    parser.add_argument("--batch", type=int, default=1, help="latent batch size")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--per-call", action="store_true", help="also time every prediction the sampler asks for "
                        "(model calls, CFG, texture transfer; the demo encoding is none of them): the per-step cost "
                        "without the one-off encoding is their median x calls per step, robust to a busy machine; the "
                        "rest of a run is the one-off")
    parser.add_argument("--mask-coverage", type=float, default=0.0, help="give each demo a subject mask: a centred "
                        "square covering this share of the image (0: no masks; the shipped toy workflows pass masks)")
    parser.add_argument("--variants", default="all", help="comma-separated ids of shipped, both, every-step, "
                        "training-free (base is always timed), or 'all'")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps ratios stable on a busy machine)"
    )
    return parser.parse_args()


VARIANTS = {  # --variants id -> row name
    "base": "base",
    "shipped": "shipped: adapter, once, cond only",
    "both": "adapter, once, cond+uncond",
    "every-step": "adapter, every step, cond only",
    "training-free": "training-free, cond only",
}


def subject_masks(args: argparse.Namespace) -> torch.Tensor | None:
    """(demos, S, S) masks of a centred square covering `--mask-coverage` of each demo, or None."""
    if not 0.0 <= args.mask_coverage <= 1.0:
        sys.exit(f"--mask-coverage {args.mask_coverage} is not a share between 0 and 1")
    if args.mask_coverage == 0.0:
        return None
    size = args.latent * 8
    side = round(size * args.mask_coverage**0.5)
    start = (size - side) // 2
    masks = torch.zeros(args.demos, size, size)
    masks[:, start:start + side, start:start + side] = 1.0
    return masks


def build_variants(args: argparse.Namespace, tiny: ch.TinyModel) -> dict:
    """name -> model patcher: the base and SuTI-patched clones of it."""
    from comfyui_suti.nodes import adapter_patch, apply, demos, layout
    from comfyui_suti.suti_core import adapter as adapter_lib

    images = torch.rand(args.demos, args.latent * 8, args.latent * 8, 3, generator=torch.Generator().manual_seed(0))
    captions = "\n".join(f"a photo of sks toy, view {i}" for i in range(args.demos))
    demo_set = demos.SuTIDemonstrations.execute(
        images, captions, ch.make_tiny_vae(), tiny.clip, args.latent * 8, subject_masks=subject_masks(args)
    ).result[0]
    source = apply.FEATURES[apply.DEFAULT_FEATURES]
    model_layout = layout.describe_model(tiny.model, source)
    adapter = adapter_patch.adapter_model_patcher(
        adapter_lib.new_adapter_for_blocks(model_layout.architecture, model_layout.context_dim, model_layout.blocks)
    )
    ch.randomize_weights_(adapter.model, seed=1, gain=0.3)  # non-zero: the neighbor path really computes

    def patched(adapter_or_none, encoding: str, apply_to: str = apply.COND_ONLY):
        return apply.SuTIApply.execute(
            tiny.model, demo_set, 1.0, 0.0, 1.0, encoding, apply_to, demo_features=apply.DEFAULT_FEATURES,
            adapter=adapter_or_none, block_weights="",
        ).result[0]

    variants = {
        "base": lambda: tiny.model,
        "shipped": lambda: patched(adapter, apply.ENCODE_ONCE),
        "both": lambda: patched(adapter, apply.ENCODE_ONCE, apply.BOTH),
        "every-step": lambda: patched(adapter, apply.ENCODE_EVERY_STEP),
        "training-free": lambda: patched(None, apply.ENCODE_ONCE),
    }
    wanted = list(variants) if args.variants == "all" else ["base", *args.variants.split(",")]
    return {VARIANTS[name]: variants[name]() for name in dict.fromkeys(wanted)}


def with_timed_predictions(model, durations: list[float]):
    """A clone whose every sampler prediction (an innermost PREDICT_NOISE wrapper: the step's model calls, CFG
    and post-CFG steps such as texture transfer; SuTI's demo encoding wrappers sit outside it) appends its
    seconds to `durations`."""
    import comfy.patcher_extension

    def timed(executor, *args, **kwargs):
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        durations.append(time.perf_counter() - start)
        return out

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "suti_step_time", timed)
    return clone


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def time_variants(args: argparse.Namespace, tiny: ch.TinyModel, variants: dict) -> tuple[dict[str, list[float]], dict]:
    """Interleaved timed runs; returns name -> list of s/step, and peak memory after base / after all."""
    positive, negative, latent = (
        tiny.cond("a photo of sks toy on a beach"),
        tiny.cond(""),
        tiny.latent(args.batch, args.latent),
    )
    memory = {}
    for name, model in variants.items():  # warm-up: first-call allocations, model loading
        ch.run_ksampler(model, positive, negative, latent, steps=1, sampler=args.sampler)
        memory.setdefault("after base", peak_rss_gib())
    timings: dict[str, list[float]] = {name: [] for name in variants}
    calls: dict[str, list[float]] = {name: [] for name in variants}
    timed = {name: with_timed_predictions(model, calls[name]) for name, model in variants.items()}
    for repeat in range(args.repeats):
        for name, model in timed.items():
            before = len(calls[name])
            start = time.perf_counter()
            ch.run_ksampler(model, positive, negative, latent, steps=args.steps, seed=repeat, sampler=args.sampler)
            total = time.perf_counter() - start
            timings[name].append(total / args.steps)
            if getattr(args, "per_call", False):
                run_calls = calls[name][before:]
                per_step = statistics.median(run_calls) * len(run_calls) / args.steps
                timings.setdefault(f"{name} [per step, no one-off]", []).append(per_step)
                timings.setdefault(f"{name} [one-off per run, s]", []).append(total - sum(run_calls))
    memory["after all variants"] = peak_rss_gib()
    return timings, memory


def feature_bytes_per_demo(arch: str, latent: int, source: str, bytes_per_value: int = 2) -> int:
    """Bytes of one demo's features (fp16) at the real widths: tokens kept per source block × its width."""
    from comfyui_suti.nodes import layout
    from comfyui_suti.suti_core.demo_features import halved_grid, pooled_grid

    tiny = ch.make_tiny_unet(arch)
    scale = ch.FULL_LAYOUTS[arch]["model_channels"] // ch.TINY_DIMS[arch]["model_channels"]
    levels = {key: level for key, level, _ in layout.walk_transformer_blocks(tiny.get_model_object("diffusion_model"))}
    total = 0
    for spec in layout.describe_model(tiny, source).blocks:
        if spec.source_key == spec.key:  # each source block once
            h, w = pooled_grid(halved_grid((latent, latent), levels[spec.key]))
            total += h * w * spec.query_dim * scale * bytes_per_value
    return total


def print_table(args: argparse.Namespace, timings: dict[str, list[float]], memory: dict) -> None:
    width = "full" if args.full_width else f"tiny (model_channels {ch.TINY_DIMS[args.arch]['model_channels']})"
    print(
        f"\nstep time, {args.arch} UNet, {width} widths, random weights, latent {args.batch}x4x{args.latent}x{args.latent}, "
        f"cfg (cond+uncond), {args.demos} demos (subject masks covering {args.mask_coverage:.0%}), {args.steps} steps x {args.repeats} runs, {args.sampler}, "
        f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}"
    )
    print(f"{'variant':<58}{'s/step median':>15}{'min':>9}{'max':>9}{'ratio median':>14}{'ratio min':>11}")
    for name, values in timings.items():
        median = statistics.median(values)
        reference = timings.get(f"base [{name.split('[')[1]}" if "[" in name else "base")
        ratio = "" if "one-off per run" in name else f"{median / statistics.median(reference):>14.2f}{min(values) / min(reference):>11.2f}"
        print(f"{name:<58}{median:>15.3f}{min(values):>9.3f}{max(values):>9.3f}{ratio}")
    print("'once' includes its one demo encoding per run, spread over the steps.")
    print("peak process memory: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in memory.items()))


def print_feature_bytes() -> None:
    from comfyui_suti.nodes.apply import FEATURES

    for arch, latent, what in (("sd15", 64, "SD1.5 at 512²"), ("sdxl", 128, "SDXL at 1024²")):
        sizes = ", ".join(f"{label} {feature_bytes_per_demo(arch, latent, source) / 2**20:.1f} MiB"
                          for label, source in FEATURES.items())
        print(f"demo features per demo (fp16), {what}: {sizes}")


def texture_transfer_ms(latent: int, demos: int, width: int = 320, repeats: int = 5) -> tuple[float, float, int, int]:
    """Median ms of one late step's texture transfer on a (1, 4, latent, latent) latent: the subject votes of one
    block at the latent's resolution (`width` channels, SD1.5's 320; the demos' tokens pooled as the pack pools
    them, a third inside the subject), then the transfer with a square subject a quarter of the image's area and
    `demos` demos masked to a square of about a third (random values: the cost depends on the counts); also the
    gated cells and the bank's patches."""
    from comfyui_suti.suti_core.demo_features import MAX_TOKENS_PER_DEMO
    from comfyui_suti.suti_core.texture_transfer import correspondence_gate, patch_bank, subject_votes, transfer_texture

    generator = torch.Generator().manual_seed(0)
    side, quarter = latent * 8, latent // 4
    mask = torch.zeros(side, side)
    mask[side * 7 // 32: side * 25 // 32, side * 7 // 32: side * 25 // 32] = 1.0
    bank = patch_bank([torch.randn(1, 4, latent, latent, generator=generator) for _ in range(demos)], [mask] * demos)
    tokens = torch.randn(1, demos * min(latent * latent, MAX_TOKENS_PER_DEMO), width, generator=generator)
    subject = torch.rand(1, tokens.shape[1], generator=generator) < 1 / 3
    hidden = torch.randn(1, latent * latent, width, generator=generator)
    votes = torch.full((1, latent * latent), -1.0)
    votes.view(latent, latent)[quarter: 3 * quarter, quarter: 3 * quarter] = 1.0
    x = torch.randn(1, 4, latent, latent, generator=generator)
    vote_times, transfer_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        subject_votes(hidden, tokens, subject)
        vote_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        gate = correspondence_gate(votes, (latent, latent))
        transfer_texture(x, bank, gate, 0.5)
        transfer_times.append(time.perf_counter() - start)
    return (statistics.median(vote_times) * 1000, statistics.median(transfer_times) * 1000, int(gate.sum()),
            len(bank.patches))


def main() -> None:
    args = parse_args()
    root = ch.find_comfyui_root()
    if root is None:
        sys.exit(ch.NO_COMFYUI_MESSAGE)
    torch.set_num_threads(args.threads)
    ch.setup_comfyui(root)
    ch.import_pack()
    tiny = ch.make_tiny_model(args.arch, **(ch.full_widths(args.arch) if args.full_width else {}))
    timings, memory = time_variants(args, tiny, build_variants(args, tiny))
    print_table(args, timings, memory)
    print_feature_bytes()
    votes_ms, ms, cells, patches = texture_transfer_ms(args.latent, args.demos)
    print(f"texture transfer alone (in the per-step rows after half-way, with subject masks): subject votes "
          f"{votes_ms:.1f} ms per block at the latent's resolution, transfer {ms:.1f} ms per step at latent "
          f"{args.latent}x{args.latent} ({cells} subject cells, {patches} demo patches)")


if __name__ == "__main__":
    main()
