"""Data-pipeline throughput (issue 13): samples/s of the synth-crawl and cluster stages on one synthetic crawl, in
this process, in `--workers` local processes and as Ray tasks, measured in the same run (ratios against 1 process).

Each backend runs `--repeats` rounds and the table gives the fastest, so Ray's first round (its workers import the
stages) counts only with --repeats 1. The local rounds come first: a process pool forked from a Ray driver inherits
Ray's signal handlers. Ray is started (or joined, with --ray-address) after them, its start-up reported on its own
line. Every backend must write the same cluster manifest, which the last line checks.

    .venv/bin/python -m benchmarks.data_throughput --pages 200
    .venv/bin/python -m benchmarks.data_throughput --pages 5000 --workers 16 --ray-address HEAD:6379
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from training.data.cluster import ClusterSettings, cluster_crawl
from training.data.common import Backend, join_ray
from training.data.crawl import synth_crawl

STAGES = ("synth-crawl", "cluster")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=200, help="synthetic pages (about 5 samples each)")
    parser.add_argument("--per-shard", type=int, default=50, help="samples per crawl shard (one task each)")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--workers", type=int, default=2, help="local processes, and the CPUs of the local Ray")
    parser.add_argument("--ray-address", help="a Ray cluster to time instead of a local Ray")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per backend (the fastest is reported)")
    return parser.parse_args(argv)


def backends(args: argparse.Namespace) -> dict[str, Backend]:
    ray = f"Ray at {args.ray_address}" if args.ray_address else f"Ray, local, {args.workers} CPUs"
    return {"local, 1 process": Backend(1), f"local, {args.workers} processes": Backend(args.workers),
            ray: Backend(args.workers, ray=True, address=args.ray_address)}


def run_stages(backend: Backend, root: Path, args: argparse.Namespace) -> tuple[dict[str, tuple[int, float]], bytes]:
    """(samples, seconds) per stage into fresh folders under `root`, and the cluster manifest's bytes."""
    start = time.perf_counter()
    crawl = synth_crawl(root / "crawl", args.pages, per_shard=args.per_shard, size=args.size, workers=backend)
    crawled = time.perf_counter()
    clusters = cluster_crawl(root / "crawl", root / "clusters", ClusterSettings(clusters_per_shard=10), backend)
    timings = {"synth-crawl": (crawl["samples"], crawled - start),
               "cluster": (clusters.total, time.perf_counter() - crawled)}
    return timings, (root / "clusters" / "manifest.jsonl").read_bytes()


def measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, tuple[int, float]]], float, bool]:
    """The fastest (samples, seconds) per backend and stage, Ray's start-up seconds, and whether all backends wrote
    the same manifest."""
    best: dict[str, dict[str, tuple[int, float]]] = {}
    manifests, startup = set(), 0.0
    with tempfile.TemporaryDirectory(prefix="suti-data-throughput-") as tmp:
        for i, (name, backend) in enumerate(backends(args).items()):
            if backend.ray:
                start = time.perf_counter()
                join_ray(backend)
                startup = time.perf_counter() - start
            for repeat in range(args.repeats):
                timings, manifest = run_stages(backend, Path(tmp) / f"{i}-{repeat}", args)
                manifests.add(manifest)
                best[name] = {stage: min(best.get(name, timings)[stage], timings[stage], key=lambda t: t[1])
                              for stage in STAGES}
    return best, startup, len(manifests) == 1


def print_table(args: argparse.Namespace, best: dict[str, dict[str, tuple[int, float]]], startup: float,
                same: bool) -> None:
    import ray

    samples = best["local, 1 process"]["synth-crawl"][0]
    print(f"\ndata throughput: {args.pages} pages → {samples} samples in {-(-samples // args.per_shard)} shards of "
          f"{args.size}px jpg, fastest of {args.repeats} round(s), ray {ray.__version__}")
    print(f"{'backend':<28}" + "".join(f"{stage + ' samples/s':>24}{'ratio':>8}" for stage in STAGES))
    reference = best["local, 1 process"]
    for name, stages in best.items():
        row = "".join(f"{n / s:>24.1f}{(n / s) / (reference[stage][0] / reference[stage][1]):>8.2f}"
                      for stage, (n, s) in stages.items())
        print(f"{name:<28}{row}")
    print(f"Ray start-up (once, not in the times above): {startup:.1f} s")
    print(f"same cluster manifest from every backend: {'yes' if same else 'NO'}")


def main() -> None:
    args = parse_args()
    best, startup, same = measure(args)
    print_table(args, best, startup, same)


if __name__ == "__main__":
    main()
