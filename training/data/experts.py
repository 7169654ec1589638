"""Stage `experts`: per subject cluster, a DreamBooth expert fine-tuned on the cluster's images renders the cluster's
new-context prompts; each (cluster, prompt) becomes one demos → target sample (the seed's teacher data, unfiltered).

    python -m training.data experts --in ~/.cache/suti/clip --prompts ~/.cache/suti/prompts \
        --out ~/.cache/suti/experts [--base models/toy/suti_toy_base.safetensors | --base SD_FOLDER] [--steps 300] \
        [--device cuda]

`--in` holds cluster shards (the cluster, clip-filter or recaption stage's), `--prompts` the prompts stage's output,
`--base` the toy base file or a diffusers SD1.x / SDXL folder (training/expert_base.py). Per cluster: its class word
is its prompts' (none: dropped as `no prompts for cluster`); only prompts that name the class word can name the
subject (the others are listed as `unnamed_prompts`; none left: `no prompt names the class word`); its demos are its
first `max_demos` decodable images whose caption names the class word, centre-cropped and resized to the base's size
(fewer than `min_images`: `too few images`). The expert (training/dreambooth.py; LoRA by default, `--full` the whole
UNet) learns the demos captioned "... sks <class word> ..." and renders each prompt with the identifier
(training/expert_shards.render_expert: DDIM with CFG). Its seeds (LoRA init, noise, renders) come from (--seed,
cluster id) alone, so a cluster's expert and renders do not depend on its shard or worker. `--device` (default cuda
when torch sees one) is where experts train and render; on Ray each task asks for one GPU on cuda, none otherwise.

Output, per input shard a shard of the same name (none when no cluster of it is kept) with one sample per rendered
prompt, key `<cluster>_<index of the prompt among the cluster's>`, in training/shards.py's image layout:

    KEY.json             {"cluster", "class_word", "identifier", "skill", "source" (the prompts stage's),
                          "target_caption" (the plain prompt), "expert_prompt" (the prompt the expert rendered),
                          "demo_keys" (the images' crawl keys), "demo_captions", "expert" (the LoRA under --out)}
    KEY.demo0.png ...    the demos as the expert learnt them (RGB, the base's size), one per demo caption
    KEY.demo0.mask.png   all subject (255): a crawled image's subject mask is unknown
    KEY.target.png       the expert's render of the prompt (RGB)
    KEY.target.mask.png  all subject: the render's mask is unknown too

It lacks only the trainer's `subject` (a world id); the filter stage keeps this layout. Beside the shards:
`experts/<cluster>.safetensors` (the expert as a ComfyUI LoRA, training/expert_export.py), `experts/<cluster>.json`
(its cost: mode, steps, seconds, prior_seconds, render_seconds, bytes), `index/<shard>.jsonl` (the shard's manifest
rows, written last: its shard is done and skipped on rerun), `manifest.jsonl` (one line per cluster: `cluster`,
`in_shard`, `out_shard`, `class_word`, `demos`, `renders`, `unnamed_prompts`, `kept`, `reason`) and `summary.json`.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from suti_core.eval.metrics import to_tensor
from suti_core.world import DemoRenders

from ..dreambooth import DEFAULT_PRIOR_CACHE, DreamBoothRecipe, DreamBoothTrainer, SubjectDemos, with_identifier
from ..expert_base import ExpertBase, load_expert_base
from ..expert_shards import DEFAULT_BASE, render_expert
from ..shards import add_sample, encode_images, read_members, sample_locations, whole_shard
from .common import (INDEX_DIR, Backend, StageSummary, claim_output, decode_image, finish_stage, image_member,
                     input_shards, read_jsonl, run_tasks, shard_fingerprint, square_image, write_atomic, write_jsonl)

EXPERTS_DIR = "experts"
NO_PROMPTS, UNNAMED, TOO_FEW = "no prompts for cluster", "no prompt names the class word", "too few images"


@dataclass(frozen=True)
class ExpertStageSettings:
    """The experts' recipe, how many of a cluster's images an expert learns (`min_images` to `max_demos`), and how
    its prompts are rendered (DDIM steps, guidance)."""

    expert: DreamBoothRecipe = field(default_factory=DreamBoothRecipe)
    min_images: int = 3
    max_demos: int = 5
    render_steps: int = 20
    cfg: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_images <= self.max_demos:
            raise ValueError(f"demos per expert need 1 <= --min-images <= --max-demos, "
                             f"got {self.min_images}..{self.max_demos}")
        if self.render_steps < 1:
            raise ValueError(f"--render-steps must be at least 1, got {self.render_steps}")


@dataclass(frozen=True)
class ExpertsRun:
    """What every shard task of a run shares: its folder, base, class-prior cache, settings, prompts by cluster and
    the torch device its experts train and render on."""

    out: Path
    base: Path
    prior_cache: Path
    settings: ExpertStageSettings
    prompts: dict[str, list[dict[str, Any]]]
    device: torch.device | str


def gpus_per_task(device: torch.device | str) -> int:
    """What a Ray task asks for: one GPU on cuda (one expert fine-tunes at a time on it), none on any other device."""
    return 1 if torch.device(device).type == "cuda" else 0


def prompt_files(folder: Path) -> list[Path]:
    """The prompts stage's per-shard files (`*.jsonl` but its manifest), in name order."""
    paths = sorted(p for p in folder.glob("*.jsonl") if p.name != "manifest.jsonl")
    if not paths:
        raise FileNotFoundError(f"no prompt files (*.jsonl) in {folder}; write them with `python -m training.data "
                                f"prompts --in CLUSTERS --out {folder}`")
    return paths


def prompts_by_cluster(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """The prompt rows of each cluster, in file and line order."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for row in read_jsonl(path):
            rows.setdefault(row["cluster"], []).append(row)
    return rows


def cluster_seed(cluster: str, seed: int) -> int:
    """A cluster's seed, from (run seed, cluster id) alone."""
    return int(np.random.default_rng([seed, int(hashlib.sha256(cluster.encode()).hexdigest()[:15], 16)])
               .integers(2**31))


def named(text: str, word: str, identifier: str) -> str | None:
    """`text` naming the subject "<identifier> <word>", or None when it does not name the class word."""
    try:
        return with_identifier(text, word, identifier)
    except ValueError:
        return None


def cluster_demos(members: dict[str, bytes], word: str, identifier: str,
                  count: int) -> list[tuple[dict[str, Any], Image.Image]]:
    """(json entry, RGB image) of the cluster's first `count` decodable images whose caption names `word`."""
    demos = []
    for i, entry in enumerate(json.loads(members["json"])["images"]):
        if len(demos) == count:
            break
        image = decode_image(members[image_member(members, i)])
        if image is not None and named(entry["caption"], word, identifier) is not None:
            demos.append((entry, image))
    return demos


def fit_cluster_expert(base: ExpertBase, cluster: str, word: str, images: np.ndarray, captions: list[str],
                       recipe: DreamBoothRecipe, prior_cache: Path) -> tuple[DreamBoothTrainer, float]:
    """Fine-tune the cluster's expert on its demos (uint8 (n, S, S, 3), plain captions); returns the trainer and the
    adaptation seconds (demo encoding and fine-tune, class images apart), as dreambooth.fit_expert counts them."""
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)  # peft draws the LoRA's initial weights from torch's global generator
    with torch.no_grad():
        latents = base.encode_images(to_tensor(list(images)))
    renders = DemoRenders(images, np.ones(images.shape[:3], dtype=bool), captions)
    demos = SubjectDemos(cluster, word, latents, [with_identifier(c, word, recipe.identifier) for c in captions],
                         renders)
    trainer = DreamBoothTrainer(base, demos, recipe, prior_cache)
    trainer.train()
    return trainer, time.perf_counter() - start - trainer.prior_seconds


def expert_cluster(members: dict[str, bytes], run: ExpertsRun) -> tuple[dict[str, Any], list[tuple[str, dict]]]:
    """One cluster's manifest fields and samples (none when it is dropped)."""
    cluster, settings = json.loads(members["json"])["cluster"], run.settings
    prompts, identifier = run.prompts.get(cluster, []), settings.expert.identifier
    row: dict[str, Any] = {"class_word": None, "demos": 0, "renders": 0, "unnamed_prompts": []}
    if not prompts:
        return {**row, "reason": NO_PROMPTS}, []
    word = prompts[0]["class_word"]
    asked = [(i, p, named(p["prompt"], word, identifier)) for i, p in enumerate(prompts)]
    row |= {"class_word": word, "unnamed_prompts": [p["prompt"] for _, p, n in asked if n is None]}
    asked = [(i, p, n) for i, p, n in asked if n is not None]
    demos = cluster_demos(members, word, identifier, settings.max_demos)
    row["demos"] = len(demos)
    if not asked or len(demos) < settings.min_images:
        return {**row, "reason": UNNAMED if not asked else TOO_FEW}, []
    return {**row, "renders": len(asked), "reason": None}, expert_samples(cluster, word, demos, asked, run)


def expert_samples(cluster: str, word: str, demos: list[tuple[dict[str, Any], Image.Image]],
                   asked: list[tuple[int, dict[str, Any], str]], run: ExpertsRun) -> list[tuple[str, dict]]:
    """Fine-tune, store and record the cluster's expert, render its (index, prompt row, identifier prompt)s; returns
    the (key, members) samples."""
    settings, seed = run.settings, cluster_seed(cluster, run.settings.seed)
    base = load_expert_base(run.base, settings.expert.identifier, run.device)
    recipe = replace(settings.expert, seed=seed)
    images = np.stack([np.asarray(square_image(image, base.image_size)) for _, image in demos])
    captions = [entry["caption"] for entry, _ in demos]
    trainer, seconds = fit_cluster_expert(base, cluster, word, images, captions, recipe, run.prior_cache)
    expert = f"{EXPERTS_DIR}/{cluster}.safetensors"
    bytes_stored = trainer.save(run.out / expert)
    start = time.perf_counter()
    renders = render_expert(base, [n for _, _, n in asked], settings.render_steps, settings.cfg, seed)
    record = {"cluster": cluster, "class_word": word, "mode": recipe.mode, "steps": trainer.steps, "seconds": seconds,
              "prior_seconds": trainer.prior_seconds, "render_seconds": time.perf_counter() - start,
              "bytes": bytes_stored, "demos": len(demos), "renders": len(renders)}
    write_atomic(run.out / EXPERTS_DIR / f"{cluster}.json", json.dumps(record, indent=1) + "\n")
    full = np.ones(images.shape[1:3], dtype=bool)  # subject masks are unknown: all subject
    samples = []
    for (i, prompt, expert_prompt), render in zip(asked, renders):
        meta = {"cluster": cluster, "class_word": word, "identifier": recipe.identifier, "skill": prompt["skill"],
                "source": prompt["source"], "target_caption": prompt["prompt"], "expert_prompt": expert_prompt,
                "demo_keys": [entry["key"] for entry, _ in demos], "demo_captions": captions, "expert": expert}
        samples.append((f"{cluster}_{i:03d}", {"json": json.dumps(meta).encode()}
                        | encode_images(images, [full] * len(images), render, full)))
    return samples


def experts_shard(shard: Path, run: ExpertsRun) -> list[dict[str, Any]]:
    """One input shard's manifest rows, read back when a previous run finished it; else its experts are trained and
    its samples written to a shard of the same name (whole, or `.partial` until whole)."""
    saved = run.out / INDEX_DIR / f"{shard.name}.jsonl"
    if saved.exists():
        return read_jsonl(saved)
    rows = []
    with ExitStack() as stack:
        tar = None
        for location in sample_locations(shard):
            found, samples = expert_cluster(read_members(location), run)
            reason = found.pop("reason")
            rows.append({"cluster": location.key, "in_shard": shard.name, "out_shard": shard.name if samples else None,
                         **found, "kept": reason is None, "reason": reason})
            for key, members in samples:
                if tar is None:
                    tar = stack.enter_context(whole_shard(run.out / shard.name))
                add_sample(tar, key, members)
    write_jsonl(saved, rows)
    return rows


def make_experts(clusters: Path, prompts: Path, out: Path, base: Path = DEFAULT_BASE,
                 settings: ExpertStageSettings = ExpertStageSettings(), prior_cache: Path = DEFAULT_PRIOR_CACHE,
                 workers: int | Backend = 1, overwrite: bool = False,
                 device: torch.device | str = "cpu") -> StageSummary:
    """Run the stage from `clusters` (cluster shards) and `prompts` (the prompts stage's folder) into `out`, training
    and rendering on `device` (not a setting: a run may resume on another)."""
    shards, prompt_paths = input_shards(clusters), prompt_files(prompts)
    if not base.exists():
        raise FileNotFoundError(f"no base at {base}; pass --base with the toy base file "
                                "(models/toy/suti_toy_base.safetensors) or a diffusers SD1.x / SDXL checkpoint folder")
    claim_output(out, {"stage": "experts", **asdict(settings), "base": str(base.resolve()),
                       "prompts": shard_fingerprint(prompt_paths), "inputs": shard_fingerprint(shards)}, overwrite)
    for folder in (INDEX_DIR, EXPERTS_DIR):
        (out / folder).mkdir(exist_ok=True)
    run = ExpertsRun(out, base, prior_cache, settings, prompts_by_cluster(prompt_paths), device)
    rows = [row for shard_rows in run_tasks(partial(experts_shard, run=run), shards, workers, "experts",
                                            gpus_per_task(device)) for row in shard_rows]
    return finish_stage(out, StageSummary("experts", notes={"renders": sum(row["renders"] for row in rows)}), rows)
