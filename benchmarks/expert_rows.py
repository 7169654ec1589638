"""Per-subject baselines for benchmarks/quality.py's table (issue 11): DreamBooth experts (LoRA, full UNet) and
Textual Inversion, side by side with SuTI on the same held-out prompts and noise.

    python -m benchmarks.quality --steps 16 --subjects 8 --prompts 4 --expert-steps 400 \\
        --method "DreamBooth LoRA=benchmarks.expert_rows:lora" \\
        --method "Textual Inversion=benchmarks.expert_rows:textual_inversion" \\
        [--method "DreamBooth full=benchmarks.expert_rows:full"]

For each subject of the prompts a row trains training/dreambooth.py's expert (its default recipe for the mode,
`--expert-steps` optimiser steps, default 400) on the 3 demos the SuTI rows are shown (rendered from
quality.DEMO_SEED + subject id), timed on this process's threads (demo encoding and fine-tune; the class images are
drawn once per class and cached, so they are not a per-subject cost), and exports it. The file is loaded by ComfyUI's
stock LoraLoader onto the base model and CLIP, and the subject's prompts are sampled by quality.BaseTextOnly's
sampler with 'sks <class>' in place of the class word: same noise, sampler and cfg as every row.

Experts are cached under ~/.cache/suti/experts, one file per (subject, recipe, demos, base file hash), with a record
of the seconds measured when it was trained: a rerun samples again but does not retrain (and reports those seconds).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import DEMO_SEED, AdaptationCost, BaseTextOnly, Prompt, prompts_by_subject
from training.dreambooth import DEFAULT_PRIOR_CACHE, DreamBoothRecipe, fit_expert, with_identifier
from training.expert_base import load_expert_base

EXPERT_CACHE = Path.home() / ".cache/suti/experts"
DEFAULT_EXPERT_STEPS = 400
TIMED = {"lora": "DreamBooth LoRA fine-tune", "full": "DreamBooth full UNet fine-tune",
         "textual-inversion": "Textual Inversion (identifier row)"}


def file_sha256(path: Path) -> str:
    """The base file's content hash: a cached expert is only reused on the very weights it was trained from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ExpertRow(BaseTextOnly):
    """A per-subject expert row: each subject's expert trained (or taken from the cache), loaded by the stock
    LoraLoader, its prompts sampled with the identifier; `adaptation` holds each subject's seconds and bytes."""

    def __init__(self, base: Path, recipe: DreamBoothRecipe, cache_dir: Path = EXPERT_CACHE,
                 prior_cache: Path = DEFAULT_PRIOR_CACHE, demos: int = 3, **sampling: Any):
        super().__init__(base, **sampling)  # imports ComfyUI and the pack
        import folder_paths

        import nodes  # ComfyUI's nodes.py: setup_comfyui put its root first on sys.path

        self.base_path, self.recipe, self.demos = base, recipe, demos
        self.cache_dir, self.prior_cache = cache_dir, prior_cache
        self.base_hash = file_sha256(base)
        self.loader = nodes.LoraLoader()
        folder_paths.add_model_folder_path("loras", str(cache_dir))  # the cache is a loras folder for this process
        self.adaptation: dict[int, AdaptationCost] = {}
        prior = "; class images apart, once per class" if recipe.uses_prior else "; no class images"
        self.adaptation_timed = f"{TIMED[recipe.mode]}, {recipe.steps} steps (demo encoding included{prior})"

    def expert_path(self, subject_id: int) -> Path:
        """The cached expert of one subject under this row's recipe, demos and base weights."""
        key = json.dumps({"base_sha256": self.base_hash, "recipe": asdict(self.recipe), "demos": self.demos,
                          "demo_seed": DEMO_SEED + subject_id}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.cache_dir / f"subject-{subject_id}-{self.recipe.mode}-{self.recipe.steps}-{digest}.safetensors"

    def expert(self, subject_id: int) -> AdaptationCost:
        """The subject's expert file, trained now (timed) or from the cache (with the seconds timed then)."""
        path = self.expert_path(subject_id)
        record = path.with_suffix(".json")  # written last: the expert is complete
        if path.is_file() and record.is_file():
            return AdaptationCost(json.loads(record.read_text())["seconds"], path.stat().st_size, cached=True)
        base = load_expert_base(self.base_path, self.recipe.identifier)
        with torch.inference_mode(False), torch.enable_grad():
            trainer, seconds = fit_expert(base, subject_id, self.demos, self.recipe, self.prior_cache,
                                          demo_seed=DEMO_SEED + subject_id)
        size = trainer.save(path)
        record.write_text(json.dumps({"subject": subject_id, "seconds": seconds, "bytes": size,
                                      "prior_seconds": trainer.prior_seconds, "steps": trainer.steps,
                                      "threads": torch.get_num_threads(), "recipe": asdict(self.recipe)}, indent=1))
        return AdaptationCost(seconds, size)

    def conditioning(self, part: Sequence[Prompt]) -> tuple[list, list]:
        """The captions with the identifier before the class word ('a sks dog ...'); the empty negative."""
        captions = [with_identifier(p.caption, p.subject.shape, self.recipe.identifier) for p in part]
        return self.encode(captions), self.encode([""] * len(part))

    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        base_model, base_clip, out = self.model, self.clip, []
        strength_model = 0.0 if self.recipe.textual_inversion else 1.0  # TI has no UNet keys
        for part in prompts_by_subject(prompts):
            sid = part[0].subject.id
            self.adaptation[sid] = self.expert(sid)
            self.model, self.clip = self.loader.load_lora(base_model, base_clip, self.expert_path(sid).name,
                                                          strength_model, 1.0)
            out.append(super().__call__(part))
        self.model, self.clip = base_model, base_clip
        return torch.cat(out)


def lora(base: Path, expert_steps: int = DEFAULT_EXPERT_STEPS, **sampling: Any) -> ExpertRow:
    """DreamBooth with a rank-8 LoRA and class-prior preservation: the issue's default expert."""
    return ExpertRow(base, DreamBoothRecipe(steps=expert_steps, mode="lora"), **sampling)


def full(base: Path, expert_steps: int = DEFAULT_EXPERT_STEPS, **sampling: Any) -> ExpertRow:
    """DreamBooth fine-tuning the whole UNet (stored as its delta): the original method, the most bytes."""
    return ExpertRow(base, DreamBoothRecipe(steps=expert_steps, mode="full"), **sampling)


def textual_inversion(base: Path, expert_steps: int = DEFAULT_EXPERT_STEPS, **sampling: Any) -> ExpertRow:
    """Textual Inversion: only the identifier's embedding row learns (UNet frozen, no class prior)."""
    return ExpertRow(base, DreamBoothRecipe(steps=expert_steps, mode="textual-inversion"), **sampling)
