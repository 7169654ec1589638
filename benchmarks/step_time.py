"""Per-step sampling time of SuTI Apply relative to the unpatched model, measured in the same run.

A tiny random UNet in ComfyUI's SD1.5 layout (tests/comfy_helpers.py) is sampled through
comfy.sample (the stock KSampler path) as: base, adapter with demos encoded once, adapter with demos
re-encoded every step, and training-free. Repeats are interleaved so background load hits every
variant alike; the table gives the median ms/step and its ratio to base.

    .venv/bin/python benchmarks/step_time.py [--arch sd15] [--steps 8] [--repeats 5] [--demos 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_helpers as ch
import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ch.ARCHS, default="sd15", help="ComfyUI layout of the tiny UNet")
    parser.add_argument("--steps", type=int, default=8, help="sampler steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--demos", type=int, default=3, help="number of demonstrations")
    parser.add_argument("--latent", type=int, default=ch.LATENT_SIZE, help="latent side (demos use the same)")
    parser.add_argument("--batch", type=int, default=1, help="latent batch size")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps ratios stable on a busy machine)"
    )
    return parser.parse_args()


def build_variants(args: argparse.Namespace, tiny: ch.TinyModel) -> dict:
    """name -> model patcher: the base and three SuTI-patched clones of it."""
    from comfyui_suti.nodes import apply, demos, patching
    from comfyui_suti.suti_core import adapter as adapter_lib

    images = torch.rand(args.demos, args.latent * 8, args.latent * 8, 3, generator=torch.Generator().manual_seed(0))
    captions = "\n".join(f"a photo of sks toy, view {i}" for i in range(args.demos))
    demo_set = demos.SuTIDemonstrations.execute(
        images, captions, ch.make_tiny_vae(), tiny.clip, args.latent * 8
    ).result[0]
    layout = patching.describe_model(tiny.model)
    adapter = patching.adapter_model_patcher(
        adapter_lib.new_adapter_for_blocks(layout.architecture, layout.context_dim, layout.blocks)
    )
    ch.randomize_weights_(adapter.model, seed=1, gain=0.3)  # non-zero: the neighbor path really computes

    def patched(adapter_or_none, encoding: str):
        return apply.SuTIApply.execute(
            tiny.model, demo_set, 1.0, 0.0, 1.0, encoding, apply.BOTH, adapter_or_none, ""
        ).result[0]

    return {
        "base": tiny.model,
        "adapter, demos once": patched(adapter, apply.ENCODE_ONCE),
        "adapter, every step": patched(adapter, apply.ENCODE_EVERY_STEP),
        "training-free": patched(None, apply.ENCODE_ONCE),
    }


def time_variants(args: argparse.Namespace, tiny: ch.TinyModel, variants: dict) -> dict[str, list[float]]:
    """Interleaved timed runs; returns name -> list of ms/step."""
    positive, negative, latent = (
        tiny.cond("a photo of sks toy on a beach"),
        tiny.cond(""),
        tiny.latent(args.batch, args.latent),
    )
    for model in variants.values():  # warm-up: first-call allocations, model loading
        ch.run_ksampler(model, positive, negative, latent, steps=1, sampler=args.sampler)
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, model in variants.items():
            start = time.perf_counter()
            ch.run_ksampler(model, positive, negative, latent, steps=args.steps, seed=repeat, sampler=args.sampler)
            timings[name].append((time.perf_counter() - start) * 1000 / args.steps)
    return timings


def print_table(args: argparse.Namespace, timings: dict[str, list[float]]) -> None:
    base = statistics.median(timings["base"])
    print(
        f"\nstep time, tiny {args.arch} UNet (model_channels {ch.TINY_DIMS[args.arch]['model_channels']}), "
        f"latent {args.batch}x4x{args.latent}x{args.latent}, cfg (cond+uncond), {args.demos} demos, "
        f"{args.steps} steps x {args.repeats} runs, {args.sampler}, torch {torch.__version__}, "
        f"CPU threads {torch.get_num_threads()}"
    )
    best = min(timings["base"])
    print(f"{'variant':<22}{'ms/step median':>16}{'min':>9}{'max':>9}{'ratio median':>14}{'ratio min':>11}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(
            f"{name:<22}{median:>16.1f}{min(values):>9.1f}{max(values):>9.1f}"
            f"{median / base:>14.2f}{min(values) / best:>11.2f}"
        )
    print("'demos once' includes its one demo encoding per run, spread over the steps.")


def main() -> None:
    args = parse_args()
    root = ch.find_comfyui_root()
    if root is None:
        sys.exit(ch.NO_COMFYUI_MESSAGE)
    torch.set_num_threads(args.threads)
    ch.setup_comfyui(root)
    ch.import_pack()
    tiny = ch.make_tiny_model(args.arch)
    timings = time_variants(args, tiny, build_variants(args, tiny))
    print_table(args, timings)


if __name__ == "__main__":
    main()
