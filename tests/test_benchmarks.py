"""The benchmark scripts still run against the current nodes (smoke runs, tiny settings)."""

from __future__ import annotations

import argparse
import math
import importlib.util
from pathlib import Path

import comfy_helpers as ch
import pytest
import torch

pytestmark = pytest.mark.slow


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ch.PACK_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_benchmark_times_every_variant(suti_pack, capsys):
    bench = _load_benchmark("step_time")
    args = argparse.Namespace(arch="sd15", steps=1, repeats=1, demos=2, latent=8, batch=1, sampler="euler", threads=1,
                              full_width=False, variants="all", mask_coverage=0.25, per_call=True)
    tiny = ch.make_tiny_model(args.arch)
    timings, memory = bench.time_variants(args, tiny, bench.build_variants(args, tiny))
    per_step = {f"{name} [per step, no one-off]" for name in bench.VARIANTS.values()}
    one_off = {f"{name} [one-off per run, s]" for name in bench.VARIANTS.values()}
    assert set(timings) == set(bench.VARIANTS.values()) | per_step | one_off
    assert all(len(v) == 1 and v[0] > 0 for k, v in timings.items() if k not in one_off)
    assert timings["shipped: adapter, once, cond only [one-off per run, s]"][0] > 0, "the demo encoding is outside every prediction"
    assert memory["after all variants"] >= memory["after base"] > 0
    bench.print_table(args, timings, memory)
    assert "ratio" in capsys.readouterr().out
    votes_ms, ms, cells, patches = bench.texture_transfer_ms(16, 3, repeats=1)
    assert votes_ms > 0 and ms > 0 and cells == 6 * 6 and patches == 3 * 6 * 6, "the interiors of an 8x8 subject and of 8x8 demo squares"
    masks = bench.subject_masks(args)
    assert masks.shape == (2, 64, 64) and float(masks.mean()) == 0.25, "a centred square of a quarter of each demo"


def test_feature_bytes_follow_the_token_cap(suti_pack):
    """SD1.5 at 512², encoder features: 2 blocks at 64x64 (320 wide, pooled to 32x32), 2 at 32x32 (640), 2 at
    16x16 (1280), the middle block at 8x8 (1280), fp16."""
    bench = _load_benchmark("step_time")
    expected = 2 * (2 * 1024 * 320 + 2 * 1024 * 640 + 2 * 256 * 1280 + 64 * 1280)
    assert bench.feature_bytes_per_demo("sd15", 64, "encoder") == expected


def test_pose_control_benchmark_samples_with_the_shipped_controlnet(suti_pack):
    from benchmarks import pose_control, quality

    prompts = pose_control.pose_free(quality.held_out_prompts(2, 1, seed=0, p_edit=0.15))
    assert not any({"left", "right", "center", "small", "large"} & set(p.caption.split()) for p in prompts)
    hints = pose_control.pose_hints(prompts)
    assert hints.shape == (2, 128, 128, 3) and set(hints.unique().tolist()) == {0.0, 1.0}
    method = pose_control.PoseControlled(quality.DEFAULT_BASE, pose_control.DEFAULT_CONTROLNET, steps=2, chunk=2)
    images = method(prompts)
    assert images.shape == (2, 3, 128, 128) and images.min() >= -1 and images.max() <= 1


def test_quality_benchmark_applies_an_adapter_file_through_the_nodes(suti_pack, tmp_path):
    """A zero-initialised adapter file reproduces the base model's images exactly; a random one changes them."""
    from benchmarks import quality
    from suti_core.adapter import save_adapter
    from suti_core.toy.checkpoint import read_toy_base
    from training.adapter_host import DiffusersSuTIHost
    from training.toy_base import ddpm_alphas_cumprod
    from training.toy_controlnet import load_base_unet

    host = DiffusersSuTIHost(load_base_unet(read_toy_base(quality.DEFAULT_BASE)), ddpm_alphas_cumprod())
    save_adapter(tmp_path / "zero.safetensors", host.new_adapter())
    adapter = host.new_adapter()
    for p in adapter.parameters():
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1
    save_adapter(tmp_path / "random.safetensors", adapter)
    prompts = quality.held_out_prompts(1, 1, seed=0, p_edit=0.15)
    base = quality.BaseTextOnly(quality.DEFAULT_BASE, steps=2)(prompts)
    zero = quality.SuTIWithDemos(quality.DEFAULT_BASE, quality.SuTISetting(tmp_path / "zero.safetensors"), steps=2)
    random = quality.SuTISetting.parse(f"adapter={tmp_path / 'random.safetensors'},apply_to=both,masks=1")
    changed = quality.SuTIWithDemos(quality.DEFAULT_BASE, random, steps=2)(prompts)
    zero = zero(prompts)
    assert zero.shape == (1, 3, 128, 128)
    torch.testing.assert_close(zero, base)
    assert (changed - base).abs().max() > 0.05
    scores = quality.score(changed, prompts, quality.default_judge())
    assert {"identity/pattern", "identity/all", "copy", "subject_fidelity"} <= scores.keys()
    assert "masks" in random.name() and "cond and uncond" in random.name()


def test_quality_benchmark_can_show_each_prompts_own_render_as_its_demos(suti_pack):
    """The diagnostic upper bound `demos_of=target`: every demo is the prompt's exact render, caption and mask."""
    from benchmarks import quality
    from suti_core.world import render

    setting = quality.SuTISetting.parse("demos_of=target,masks=1,demos=2")
    method = quality.SuTIWithDemos(quality.DEFAULT_BASE, setting, steps=2)
    prompt = quality.held_out_prompts(1, 1, seed=0, p_edit=0.15)[0]
    demos = method.demos_for(prompt)
    assert len(demos) == 2 and all(d.caption == prompt.caption and d.mask is not None for d in demos)
    expected = method.vae.encode(torch.from_numpy(render(prompt.subject, prompt.context, 128, prompt.seed))[None] / 255)
    torch.testing.assert_close(demos[0].latent, expected)
    assert "the target itself" in setting.name()
    with pytest.raises(SystemExit, match="demos_of"):
        quality.SuTISetting.parse("demos_of=elsewhere")


def test_suti_rows_encode_their_demos_at_the_demonstrations_nodes_size(suti_pack):
    """`demo_size` is SuTI Demonstrations' size: 256 px demos give 32x32 latents (the default 128: 16x16)."""
    from benchmarks import quality

    prompt = quality.held_out_prompts(1, 1, seed=0, p_edit=0.0)[0]
    large = quality.SuTIWithDemos(quality.DEFAULT_BASE, quality.SuTISetting.parse("demo_size=256,masks=1"), steps=2)
    default = quality.SuTIWithDemos(quality.DEFAULT_BASE, quality.SuTISetting.parse("masks=1"), steps=2)
    demo = large.demos_for(prompt)[0]
    assert demo.latent.shape[-2:] == (32, 32)
    assert demo.mask.shape == (256, 256)
    assert default.demos_for(prompt)[0].latent.shape[-2:] == (16, 16)
    assert "demos at 256 px" in large.setting.name() and "px" not in default.setting.name()


def test_base_from_the_truth_keeps_more_identity_the_less_it_denoises(suti_pack):
    """The SDEdit diagnostic: at a small share of the schedule the image stays near the exact render."""
    from benchmarks import quality

    prompts = quality.held_out_prompts(2, 1, seed=0, p_edit=0.0)
    truth = quality.renderer_truth(prompts)
    light = quality.BaseFromTruth(quality.DEFAULT_BASE, 0.1, steps=4)(prompts)
    full = quality.BaseFromTruth(quality.DEFAULT_BASE, 1.0, steps=4)(prompts)
    assert (light - truth).abs().mean() < 0.5 * (full - truth).abs().mean()
    with pytest.raises(SystemExit, match="from-truth"):
        quality.BaseFromTruth(quality.DEFAULT_BASE, 0.0)


def test_suti_from_the_truth_starts_at_the_exact_render(suti_pack):
    """`--suti ...,from_truth=D`: the same SDEdit start as --from-truth, with SuTI applied over the last steps."""
    from benchmarks import quality

    prompts = quality.held_out_prompts(2, 1, seed=0, p_edit=0.0)
    truth = quality.renderer_truth(prompts)
    shipped = Path(quality.__file__).resolve().parents[1] / "models/suti/suti_toy_adapter.safetensors"
    setting = quality.SuTISetting.parse(f"adapter={shipped},masks=1,from_truth=0.1")
    light = quality.SuTIWithDemos(quality.DEFAULT_BASE, setting, steps=4)(prompts)
    full = quality.BaseTextOnly(quality.DEFAULT_BASE, steps=4)(prompts)
    assert (light - truth).abs().mean() < 0.5 * (full - truth).abs().mean()
    assert "from the truth noised to 0.1" in setting.name()
    with pytest.raises(SystemExit, match="from_truth"):
        quality.SuTIWithDemos(quality.DEFAULT_BASE, quality.SuTISetting.parse("from_truth=1.5"))


def test_suti_rows_take_the_apply_nodes_range_and_block_weights(suti_pack):
    """`start_percent` / `end_percent` and `block_weights` reach SuTI Apply: a range that ends before the first
    step, or every group at weight 0, leaves the base's images; bad values are refused with the node's message."""
    from benchmarks import quality

    prompts = quality.held_out_prompts(1, 1, seed=0, p_edit=0.0)
    shipped = Path(quality.__file__).resolve().parents[1] / "models/suti/suti_toy_adapter.safetensors"
    never = quality.SuTISetting.parse(f"adapter={shipped},masks=1,end_percent=0")
    nowhere = quality.SuTISetting.parse(f"adapter={shipped},block_weights=input:0,middle:0,output:0,masks=1")
    whole = quality.SuTISetting.parse(f"adapter={shipped},masks=1")
    base = quality.BaseTextOnly(quality.DEFAULT_BASE, steps=2)(prompts)
    for off in (never, nowhere):
        torch.testing.assert_close(quality.SuTIWithDemos(quality.DEFAULT_BASE, off, steps=2)(prompts), base)
    assert (quality.SuTIWithDemos(quality.DEFAULT_BASE, whole, steps=2)(prompts) - base).abs().max() > 0.05
    assert nowhere.masks and nowhere.block_weights == "input:0,middle:0,output:0"
    assert "percent 0-0 of the schedule" in never.name() and "block weights input:0" in nowhere.name()
    assert "percent" not in whole.name() and "block weights" not in whole.name()
    for bad, message in (("start_percent=0.8,end_percent=0.5", "start_percent 0.8 is after end_percent 0.5"),
                         ("block_weights=output:3", "weight must be between 0 and 2")):
        with pytest.raises(SystemExit, match=message):
            quality.SuTIWithDemos(quality.DEFAULT_BASE, quality.SuTISetting.parse(bad))


def test_rows_can_sample_through_comfyui_model_nodes(suti_pack):
    """`--model-node`: every sampled row goes through the node (ComfyUI's PAG here); at scale 0 PAG is a no-op,
    and a spec that names no node says what it wants."""
    from benchmarks import quality

    prompts = quality.held_out_prompts(1, 1, seed=0, p_edit=0.0)
    pag = "comfy_extras.nodes_pag:PerturbedAttentionGuidance,scale={}"
    base = quality.BaseTextOnly(quality.DEFAULT_BASE, steps=2)(prompts)
    off = quality.BaseTextOnly(quality.DEFAULT_BASE, steps=2, model_nodes=[pag.format(0)])(prompts)
    on = quality.BaseTextOnly(quality.DEFAULT_BASE, steps=2, model_nodes=[pag.format(5)])(prompts)
    torch.testing.assert_close(off, base)
    assert (on - base).abs().max() > 0.01
    suti = quality.SuTIWithDemos(quality.DEFAULT_BASE, quality.SuTISetting(), steps=2, model_nodes=[pag.format(5)])
    assert suti.model.model_options.get("sampler_post_cfg_function")
    with pytest.raises(SystemExit, match="package.module:Node"):
        quality.BaseTextOnly(quality.DEFAULT_BASE, model_nodes=["PerturbedAttentionGuidance"])
    with pytest.raises(SystemExit, match="has no node 'Nope'"):
        quality.BaseTextOnly(quality.DEFAULT_BASE, model_nodes=["comfy_extras.nodes_pag:Nope"])


def test_two_suti_rows_of_the_same_name_are_refused(suti_pack, tmp_path, monkeypatch):
    """Rows are keyed by name: two adapter files called alike would silently keep only the last row."""
    from benchmarks import quality

    shipped = Path(quality.__file__).resolve().parents[1] / "models/suti/suti_toy_adapter.safetensors"
    copies = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        copies.append(tmp_path / run / "latest.safetensors")
        copies[-1].write_bytes(shipped.read_bytes())
    monkeypatch.setattr("sys.argv", ["quality", "--no-ceilings", "--no-base", "--subjects", "1", "--prompts", "1",
                                     *(a for c in copies for a in ("--suti", f"adapter={c}"))])
    with pytest.raises(SystemExit, match="different names"):
        quality.main()


def test_pattern_table_reads_accuracy_per_true_pattern_and_subject_size():
    """Where the pattern shows, accuracy is grouped by the subject's true pattern and by view; hidden ones drop out."""
    from benchmarks import quality

    prompts = quality.held_out_prompts(8, 2, seed=0, p_edit=0.0)
    right = torch.tensor([1.0 if p.subject.pattern == "stripes" else 0.0 for p in prompts], dtype=torch.float64)
    right[0] = math.nan  # a context that hides the pattern
    table = quality.pattern_table({"row": {"identity/pattern": right}}, prompts)
    cells = dict(zip(table.splitlines()[0].split(" | ")[1:], table.splitlines()[2].split(" | ")[1:]))
    stripes = sum(p.subject.pattern == "stripes" for p in prompts[1:])
    assert cells["stripes"] == f"1.00 (n={stripes})" and cells["dots"].startswith("0.00")
    assert sum(int(c.split("n=")[1].rstrip(") |")) for k, c in cells.items() if "view" in k) == len(prompts) - 1


def test_colour_table_splits_the_colour_heads_by_whether_the_prompt_asks_a_recolour():
    """A row that gets every colour right except where the text asks another one reads 0 there and 1 elsewhere."""
    from benchmarks import quality

    prompts = quality.held_out_prompts(30, 4, seed=0, p_edit=0.15)
    recoloured = torch.tensor([p.context.recolor != "none" for p in prompts])
    right = (~recoloured).double()
    secondary = right.clone()
    secondary[~recoloured] = math.nan  # the secondary hidden wherever no recolour is asked
    table = quality.colour_table({"row": {"identity/primary": right, "identity/secondary": secondary}}, prompts)
    header, _, row = (line.strip(" |").split(" | ") for line in table.splitlines())
    cells = dict(zip(header[1:], row[1:], strict=True))
    n = int(recoloured.sum())
    assert 0 < n < len(prompts)
    assert cells["recoloured"] == f"0.00 (n={n}) / 0.00 (n={n})"
    assert cells["not recoloured"] == f"1.00 (n={len(prompts) - n}) / n/a"
