"""`python -m training.data <stage> ...`: one subcommand per data stage (see training/data/__init__.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..device import default_device
from ..dreambooth import add_recipe_arguments, recipe_from_args
from ..expert_shards import DEFAULT_BASE
from ..render_filter import DEFAULT_FILTER
from .captioners import CaptionCommandError, CommandCaptioner, ModelCaptioner
from .clip_filter import ClipFilterSettings, ClipModel, clip_filter, load_settings
from .cluster import ClusterSettings, cluster_crawl
from .common import Backend
from .crawl import NoiseRates, synth_crawl
from .experts import ExpertStageSettings, make_experts
from .filter_renders import FilterSettings, filter_renders, load_filter_settings
from .pack import PackSettings, pack
from .prompts import PromptCommandError, PromptSettings, read_class_words, write_prompts
from .recaption import RecaptionSettings, recaption


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (a rerun with the same settings resumes)")
    parser.add_argument("--workers", type=int, default=1,
                        help="local processes (1: in this one), or the CPUs of the local Ray that --ray starts")
    parser.add_argument("--ray", action="store_true", help="run the stage's tasks on Ray (the `ray` extra)")
    parser.add_argument("--ray-address", help="the Ray cluster to run on (implies --ray): HEAD:6379 from one of its "
                        "nodes (auto: the one `ray start` began here), or ray://HEAD:10001 from elsewhere (needs pip "
                        "install \"ray[client]\")")
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
    _recaption_parser(stages)
    _experts_parser(stages)
    _filter_parser(stages)
    _pack_parser(stages)
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


def _recaption_parser(stages: argparse._SubParsersAction) -> None:
    recap = stages.add_parser("recaption", help="replace alt text with a captioner's captions (a model or a command)")
    _common(recap)
    recap.add_argument("--in", dest="input", type=Path, required=True, help="cluster or clip-filter output folder")
    captioner = recap.add_mutually_exclusive_group(required=True)
    captioner.add_argument("--model", type=Path, help="local transformers image-to-text folder (save_pretrained)")
    captioner.add_argument("--command", help="external captioner: JSON lines {cluster, key, path} on stdin, one "
                                             "caption line per image out (toy world: python -m "
                                             "training.data.toy_captioner)")
    recap.add_argument("--device", default=None, help="--model's torch device (default: cuda when there is one)")
    recap.add_argument("--max-new-tokens", type=int, default=ModelCaptioner.max_new_tokens,
                       help="--model's longest caption in tokens")
    recap.add_argument("--command-timeout", type=float, default=CommandCaptioner.timeout,
                       help="--command's seconds per input shard")
    recap.add_argument("--min-size", type=int, default=RecaptionSettings().min_size,
                       help="fewest images a recaptioned cluster keeps")


def _recaption(args: argparse.Namespace) -> str:
    captioner = (CommandCaptioner(args.command, args.command_timeout) if args.command is not None
                 else ModelCaptioner(args.model, _device(args.device), args.max_new_tokens))
    return recaption(args.input, args.out, captioner, RecaptionSettings(args.min_size), args.workers,
                     args.overwrite).line()


def _experts_parser(stages: argparse._SubParsersAction) -> None:
    experts = stages.add_parser("experts", help="a DreamBooth expert per cluster renders the cluster's prompts")
    _common(experts)
    defaults = ExpertStageSettings()
    experts.add_argument("--in", dest="input", type=Path, required=True,
                         help="cluster shards: the clip-filter or recaption stage's output folder")
    experts.add_argument("--prompts", type=Path, required=True, help="the prompts stage's output folder")
    experts.add_argument("--base", type=Path, default=DEFAULT_BASE,
                         help="toy base .safetensors or diffusers SD1.x/SDXL checkpoint folder")
    add_recipe_arguments(experts)
    experts.add_argument("--min-images", type=int, default=defaults.min_images,
                         help="fewest usable images (caption naming the class word) a cluster's expert learns")
    experts.add_argument("--max-demos", type=int, default=defaults.max_demos, help="most images an expert learns")
    experts.add_argument("--render-steps", type=int, default=defaults.render_steps, help="DDIM steps per render")
    experts.add_argument("--cfg", type=float, default=defaults.cfg, help="classifier-free guidance of the renders")
    experts.add_argument("--seed", type=int, default=defaults.seed, help="with the cluster id: LoRA init, renders")


def _filter_parser(stages: argparse._SubParsersAction) -> None:
    keep = stages.add_parser("filter", help="keep the expert renders the render filter network (toy world) or an "
                                            "open_clip model (real data) accepts")
    _common(keep)
    defaults = FilterSettings()
    keep.add_argument("--in", dest="input", type=Path, required=True, help="the experts stage's output folder")
    scorer = keep.add_mutually_exclusive_group()
    scorer.add_argument("--filter", type=Path, help="render filter (train_judge --role filter; the evaluation "
                                                    f"judge is refused), default {DEFAULT_FILTER}")
    scorer.add_argument("--clip", type=Path, help="open_clip folder (open_clip_config.json + weights) or weights file "
                                                  "(with --clip-name) to score renders by CLIP instead (real data)")
    keep.add_argument("--clip-name", help="open_clip architecture of a --clip weights file, e.g. ViT-B-32")
    keep.add_argument("--device", help="--clip's torch device (default: cuda when there is one, else cpu)")
    keep.add_argument("--config", type=Path,
                      help="TOML/JSON file with min_prob, min_confidence (--filter), clip_subject, clip_text (--clip)")
    keep.add_argument("--min-prob", type=float,
                      help=f"least probability of each expected identity / context class (default {defaults.min_prob})")
    keep.add_argument("--min-confidence", type=float,
                      help=f"least mean confidence of the checked heads (default {defaults.min_confidence})")
    keep.add_argument("--clip-subject", type=float,
                      help=f"--clip: least mean cosine of a render to its demos (default {defaults.clip_subject})")
    keep.add_argument("--clip-text", type=float,
                      help=f"--clip: least cosine of a render to its prompt (default {defaults.clip_text})")


def _experts(args: argparse.Namespace) -> str:
    settings = ExpertStageSettings(recipe_from_args(args), args.min_images, args.max_demos, args.render_steps,
                                   args.cfg, args.seed)
    return make_experts(args.input, args.prompts, args.out, args.base, settings, args.prior_cache, args.workers,
                        args.overwrite, args.device).line()


def _filter(args: argparse.Namespace) -> str:
    if args.clip is None and (args.clip_name is not None or args.device is not None):
        raise ValueError("--clip-name and --device go with --clip (an open_clip model); the render filter runs on cpu")
    settings = load_filter_settings(args.config, min_prob=args.min_prob, min_confidence=args.min_confidence,
                                    clip_subject=args.clip_subject, clip_text=args.clip_text)
    scorer = (ClipModel(args.clip, args.clip_name, _device(args.device), "--clip") if args.clip is not None
              else args.filter or DEFAULT_FILTER)
    return filter_renders(args.input, args.out, scorer, settings, args.workers, args.overwrite).line()


def _pack_parser(stages: argparse._SubParsersAction) -> None:
    packer = stages.add_parser("pack", help="the filtered renders as the adapter trainer's shards (--shards)")
    _common(packer)
    defaults = PackSettings()
    packer.add_argument("--in", dest="input", type=Path, required=True, help="the filter stage's output folder")
    packer.add_argument("--demos", type=int, default=defaults.demos,
                        help="demos per sample, the trainer's --demos (samples with fewer are dropped)")
    packer.add_argument("--size", type=int, default=defaults.size, help="image side, the trainer's base's (toy: 128)")
    packer.add_argument("--seed", type=int, default=defaults.seed, help="seed of each sample's demo draw")


def _device(requested: str | None) -> str:
    return requested if requested is not None else default_device()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        # every stage takes `workers`: a Backend carries --workers, --ray and --ray-address to its tasks
        args.workers = Backend(args.workers, args.ray or args.ray_address is not None, args.ray_address)
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
        elif args.stage == "recaption":
            print(_recaption(args))
        elif args.stage == "experts":
            print(_experts(args))
        elif args.stage == "pack":
            settings = PackSettings(args.demos, args.size, args.seed)
            print(pack(args.input, args.out, settings, args.workers, args.overwrite).line())
        elif args.stage == "filter":
            print(_filter(args))
        else:
            settings = PromptSettings(args.per_cluster, args.seed, read_class_words(args.class_words), args.command,
                                      args.command_timeout)
            print(write_prompts(args.input, args.out, settings, args.workers, args.overwrite).line())
    except (FileExistsError, FileNotFoundError, ValueError, PromptCommandError, ModuleNotFoundError,
            CaptionCommandError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
