"""The benchmark scripts still run against the current nodes (smoke runs, tiny settings)."""

from __future__ import annotations

import argparse
import importlib.util

import comfy_helpers as ch
import pytest

pytestmark = pytest.mark.slow


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ch.PACK_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_benchmark_times_every_variant(suti_pack, capsys):
    bench = _load_benchmark("step_time")
    args = argparse.Namespace(arch="sd15", steps=1, repeats=1, demos=2, latent=8, batch=1, sampler="euler", threads=1)
    tiny = ch.make_tiny_model(args.arch)
    timings = bench.time_variants(args, tiny, bench.build_variants(args, tiny))
    assert set(timings) == {"base", "adapter, demos once", "adapter, every step", "training-free"}
    assert all(len(v) == 1 and v[0] > 0 for v in timings.values())
    bench.print_table(args, timings)
    assert "ratio" in capsys.readouterr().out


def test_pose_control_benchmark_samples_with_the_shipped_controlnet(suti_pack):
    from benchmarks import pose_control, quality

    prompts = pose_control.pose_free(quality.held_out_prompts(2, 1, seed=0, p_edit=0.15))
    assert not any({"left", "right", "center", "small", "large"} & set(p.caption.split()) for p in prompts)
    hints = pose_control.pose_hints(prompts)
    assert hints.shape == (2, 128, 128, 3) and set(hints.unique().tolist()) == {0.0, 1.0}
    method = pose_control.PoseControlled(quality.DEFAULT_BASE, pose_control.DEFAULT_CONTROLNET, steps=2, chunk=2)
    images = method(prompts)
    assert images.shape == (2, 3, 128, 128) and images.min() >= -1 and images.max() <= 1
