"""`python -m training.data <stage> ...`: one subcommand per data stage (see training/data/__init__.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cluster import ClusterSettings, cluster_crawl
from .crawl import NoiseRates, synth_crawl


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (a rerun with the same settings resumes)")
    parser.add_argument("--workers", type=int, default=1, help="local processes (1: in this one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run with other settings in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True)
    crawl = stages.add_parser("synth-crawl", help="a synthetic img2dataset crawl with noise at known rates")
    _common(crawl)
    crawl.add_argument("--pages", type=int, required=True, help="pages to crawl (about 5 images each)")
    crawl.add_argument("--seed", type=int, default=0)
    crawl.add_argument("--per-shard", type=int, default=1000, help="samples per tar (img2dataset's default 10000)")
    crawl.add_argument("--size", type=int, default=128, help="image side, a multiple of 16")
    crawl.add_argument("--format", choices=("jpg", "png"), default="jpg")
    cluster = stages.add_parser("cluster", help="group a crawl into subject clusters by normalised page URL")
    _common(cluster)
    defaults = ClusterSettings()
    cluster.add_argument("--in", dest="input", type=Path, required=True, help="img2dataset output folder (*.tar)")
    cluster.add_argument("--min-size", type=int, default=defaults.min_size, help="fewest images a cluster keeps")
    cluster.add_argument("--max-size", type=int, default=defaults.max_size, help="most images a cluster keeps")
    cluster.add_argument("--page-field", default=defaults.page_field,
                         help="json field with the source page URL (img2dataset: save it as an additional column)")
    cluster.add_argument("--clusters-per-shard", type=int, default=defaults.clusters_per_shard)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.stage == "synth-crawl":
            summary = synth_crawl(args.out, args.pages, args.seed, args.per_shard, args.size, args.format,
                                  rates=NoiseRates(), workers=args.workers, overwrite=args.overwrite)
            print(f"synth-crawl: {args.pages} pages → {summary['samples']} samples in {summary['shards']} shards; "
                  f"noise {json.dumps(summary['noise'])}")
        else:
            settings = ClusterSettings(args.min_size, args.max_size, args.page_field, args.clusters_per_shard)
            print(cluster_crawl(args.input, args.out, settings, args.workers, args.overwrite).line())
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
