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
