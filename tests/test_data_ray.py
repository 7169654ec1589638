"""Ray scale-out of the data stages (issue 13): run as Ray tasks on a local Ray of 2 CPUs, each stage writes byte for
byte what local processes write; results keep task order, a failing task raises its own error, a GPU need this
machine's Ray cannot meet fails at once; without Ray installed, local mode still works while `--ray` says how to
install it; and the throughput benchmark runs."""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
from data_stage_helpers import folder_bytes, write_tiny_clip

from training.data import common
from training.data.__main__ import main
from training.data.common import Backend, run_tasks


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for this module; the stages join it instead of starting their own."""
    ray = pytest.importorskip("ray")  # the optional `ray` extra
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _stage_runs(tmp_path: Path, mode: str, flags: list[str]) -> Path:
    """synth-crawl → cluster → prompts through the command line, each into tmp_path/mode/<stage>."""
    root = tmp_path / mode
    main(["synth-crawl", "--out", str(root / "crawl"), "--pages", "24", "--seed", "3", "--per-shard", "30",
          "--size", "32", *flags])
    main(["cluster", "--in", str(root / "crawl"), "--out", str(root / "clusters"), "--clusters-per-shard", "3",
          *flags])
    main(["prompts", "--in", str(root / "clusters"), "--out", str(root / "prompts"), "--per-cluster", "4", *flags])
    return root


@pytest.fixture
def ray_calls(monkeypatch) -> list[int]:
    """The task counts of every run_tasks call that went to Ray."""
    calls, ray_map = [], common._ray_map

    def counted(function, tasks, *args):
        calls.append(len(tasks))
        return ray_map(function, tasks, *args)

    monkeypatch.setattr(common, "_ray_map", counted)
    return calls


def test_ray_mode_writes_what_local_processes_write(ray_cluster, ray_calls, tmp_path):
    local = _stage_runs(tmp_path, "local", ["--workers", "2"])
    assert not ray_calls, "--workers alone stays in local processes"
    on_ray = _stage_runs(tmp_path, "ray", ["--ray"])
    assert len(ray_calls) == 4, "synth-crawl, cluster (index, write) and prompts each ran their tasks on Ray"
    for stage in ("crawl", "clusters", "prompts"):
        expected = folder_bytes(local / stage)
        assert len([name for name in expected if name.endswith(".tar") or name.startswith("shard-")]) >= 2, \
            f"{stage} should have several shards, so that several Ray tasks write them"
        assert folder_bytes(on_ray / stage) == expected, f"{stage}: Ray mode wrote other bytes than local mode"


def test_clip_filter_on_ray_writes_what_it_writes_locally(ray_cluster, ray_calls, tmp_path):
    pytest.importorskip("open_clip")  # the `train` extra
    root = _stage_runs(tmp_path, "input", [])
    model = write_tiny_clip(tmp_path)
    for mode, flags in (("local", []), ("ray", ["--ray"])):
        main(["clip-filter", "--in", str(root / "clusters"), "--out", str(tmp_path / mode), "--model", str(model),
              "--device", "cpu", "--image-image", "0.5", "--image-text", "-0.2", "--min-size", "2", *flags])
    assert len(ray_calls) == 1
    expected = folder_bytes(tmp_path / "local")
    manifest = expected["manifest.jsonl"].decode()
    assert '"kept": false' in manifest and '"kept": true' in manifest, "the thresholds should drop some images"
    assert folder_bytes(tmp_path / "ray") == expected


def test_ray_results_keep_task_order_and_a_failing_task_raises_its_own_error(ray_cluster):
    backend = Backend(2, ray=True)
    assert run_tasks(abs, [-3, 1, -2, 0, -5], backend, "abs") == [3, 1, 2, 0, 5]
    with pytest.raises(ValueError, match="invalid literal"):
        run_tasks(partial(int, base=10), ["1", "x", "3"], backend, "parse")


def test_tasks_needing_more_gpus_than_this_machines_ray_has_fail_at_once(ray_cluster):
    with pytest.raises(ValueError, match="experts: each Ray task needs 1 GPU.* has 0"):  # Ray itself would wait
        run_tasks(abs, [-1], Backend(2, ray=True), "experts", gpus_per_task=1)
    assert run_tasks(abs, [-1], Backend(2), "experts", gpus_per_task=1) == [1], "local mode ignores GPU needs"


def test_without_ray_local_mode_works_and_ray_flags_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    main(["synth-crawl", "--out", str(tmp_path / "crawl"), "--pages", "4", "--size", "16"])
    assert "synth-crawl: 4 pages" in capsys.readouterr().out
    for flags in (["--ray"], ["--ray-address", "ray://head:10001"]):
        with pytest.raises(SystemExit, match=r'--ray needs Ray.*pip install "ray>=2\.9"'):
            main(["cluster", "--in", str(tmp_path / "crawl"), "--out", str(tmp_path / "clusters"), *flags])
        assert not (tmp_path / "clusters").exists(), "the missing dependency is found before any work"


def test_the_throughput_benchmark_times_every_backend_on_the_same_outputs(ray_cluster, capsys):
    from benchmarks import data_throughput

    args = data_throughput.parse_args(["--pages", "8", "--size", "16", "--per-shard", "10", "--repeats", "1"])
    best, startup, same = data_throughput.measure(args)
    assert list(best) == ["local, 1 process", "local, 2 processes", "Ray, local, 2 CPUs"] and same
    assert all(seconds > 0 and samples > 0 for stages in best.values() for samples, seconds in stages.values())
    data_throughput.print_table(args, best, startup, same)
    assert "same cluster manifest from every backend: yes" in capsys.readouterr().out
