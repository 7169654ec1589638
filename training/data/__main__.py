"""`python -m training.data <stage> ...`: one subcommand per data stage (see training/data/__init__.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .clip_filter import ClipFilterSettings, ClipModel, clip_filter, load_settings
from .cluster import ClusterSettings, cluster_crawl
from .crawl import NoiseRates, synth_crawl
from .prompts import PromptCommandError, PromptSettings, read_class_words, write_prompts


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
    _clip_filter_parser(stages)
    _prompts_parser(stages)
    return parser


def _clip_filter_parser(stages: argparse._SubParsersAction) -> None:
    clip = stages.add_parser("clip-filter", help="drop off-subject images and mismatched captions with open_clip")
    _common(clip)
    defaults = ClipFilterSettings()
    clip.add_argument("--in", dest="input", type=Path, required=True, help="the cluster stage's output folder")
    clip.add_argument("--model", type=Path, required=True,
                      help="open_clip folder (open_clip_config.json + weights) or weights file (with --model-name)")
    clip.add_argument("--model-name", help="open_clip architecture of a weights file, e.g. ViT-B-32")
    clip.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    clip.add_argument("--config", type=Path, help="TOML/JSON file with image_image, image_text, min_size")
    clip.add_argument("--image-image", type=float,
                      help=f"least mean cosine to the cluster's other images (default {defaults.image_image})")
    clip.add_argument("--image-text", type=float,
                      help=f"least cosine to the image's own caption (default {defaults.image_text})")
    clip.add_argument("--min-size", type=int, help=f"fewest images a filtered cluster keeps (default "
                                                   f"{defaults.min_size})")


def _prompts_parser(stages: argparse._SubParsersAction) -> None:
    prompts = stages.add_parser("prompts", help="new-context prompts per cluster: templates by skill + a command")
    _common(prompts)
    defaults = PromptSettings()
    prompts.add_argument("--in", dest="input", type=Path, required=True, help="cluster or clip-filter output folder")
    prompts.add_argument("--per-cluster", type=int, default=defaults.per_cluster,
                         help="template prompts per cluster (skills in turn), and at most as many from --command")
    prompts.add_argument("--seed", type=int, default=defaults.seed)
    prompts.add_argument("--class-words", type=Path, help="class words, one a line (default: the toy world's shapes)")
    prompts.add_argument("--command", help="external prompt command (e.g. an LLM): captions on stdin, prompts out")
    prompts.add_argument("--command-timeout", type=float, default=defaults.command_timeout, help="seconds per cluster")


def _device(requested: str | None) -> str:
    if requested is not None:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.stage == "synth-crawl":
            summary = synth_crawl(args.out, args.pages, args.seed, args.per_shard, args.size, args.format,
                                  rates=NoiseRates(), workers=args.workers, overwrite=args.overwrite)
            print(f"synth-crawl: {args.pages} pages → {summary['samples']} samples in {summary['shards']} shards; "
                  f"noise {json.dumps(summary['noise'])}")
        elif args.stage == "cluster":
            settings = ClusterSettings(args.min_size, args.max_size, args.page_field, args.clusters_per_shard)
            print(cluster_crawl(args.input, args.out, settings, args.workers, args.overwrite).line())
        elif args.stage == "clip-filter":
            settings = load_settings(args.config, image_image=args.image_image, image_text=args.image_text,
                                     min_size=args.min_size)
            spec = ClipModel(args.model, args.model_name, _device(args.device))
            print(clip_filter(args.input, args.out, spec, settings, args.workers, args.overwrite).line())
        else:
            settings = PromptSettings(args.per_cluster, args.seed, read_class_words(args.class_words), args.command,
                                      args.command_timeout)
            print(write_prompts(args.input, args.out, settings, args.workers, args.overwrite).line())
    except (FileExistsError, FileNotFoundError, ValueError, PromptCommandError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
