"""Expert data for the apprentice (issue 11): per-subject DreamBooth experts render their subject in new contexts,
the render filter keeps or drops each render, and both sets become WebDataset shards for
`python -m training.train_adapter --shards`.

For each of K train-split subjects (the first K of a permutation of the train split drawn from --seed, so a larger
K extends a run): fine-tune a DreamBooth expert on the subject's demos (training/dreambooth.py; LoRA by default),
render it (DDIM with CFG) for M new-context prompts that name it "sks <class>" and take the six skills in turn,
score every render with training/render_filter.RenderFilter (never the evaluation judge), and write

    OUT/unfiltered/shard-<k>.tar            every render of the k-th subject
    OUT/filtered/shard-<k>.tar              its kept renders (no shard when none is kept)
    OUT/experts/subject-<id>.safetensors    the expert (a ComfyUI LoRA: its bytes are the per-subject storage)
    OUT/subjects/subject-<id>.json          the subject's record (written last: the subject is done)
    OUT/report.json                         adaptation cost per subject, keep rate overall and per skill, drops

A sample's demos are the expert's own training demos (images, subject masks, plain captions); its target is the
expert's render, captioned by the plain prompt (the identifier is the expert's word, not the apprentice's). The
target mask is all-True: the render's subject mask is unknown, the trainer reads it only for --subject-weight,
and an all-True mask makes that weighting plain MSE.

    python -m training.expert_shards --out ~/.cache/suti/shards/experts --subjects 16 --prompts 8 --steps 300
    python -m training.train_adapter --shards ~/.cache/suti/shards/experts/filtered --resume
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from suti_core.eval.metrics import to_tensor
from suti_core.eval.skills import SKILLS
from suti_core.world import Context, caption_for, sample_context, subject_from_id, subject_ids
from suti_core.world.context import ACCESSORIES, RECOLORS, STYLES

from .data.common import differing_settings, write_atomic
from .dreambooth import (DEFAULT_PRIOR_CACHE, DreamBoothRecipe, add_recipe_arguments, fit_expert, recipe_from_args,
                         with_identifier)
from .examples import SubjectExample
from .expert_base import ExpertBase, load_expert_base
from .expert_prior import PriorSettings, ddim_sample
from .render_filter import DEFAULT_FILTER, FilterDecision, RenderFilter, summarise
from .shards import SHARD_GLOB, ShardWriter

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = ROOT / "models/toy/suti_toy_base.safetensors"
# Each skill's edit of a plain new context (field, values), one per suti_core.eval.skills entry; recontextualisation
# is the plain context itself.
SKILL_EDITS: dict[str, tuple[str, tuple[str, ...]] | None] = {
    "recontextualisation (no edit)": None, "stylisation": ("style", STYLES[1:]), "recolour": ("recolor", RECOLORS[1:]),
    "accessory": ("accessory", ACCESSORIES[1:]), "state (upside down)": ("state", ("upside_down",)),
    "view (small)": ("scale", ("small",)),
}
OWN_FILES = ("subjects/subject-*.json", "experts/subject-*.safetensors", f"unfiltered/{SHARD_GLOB}",
             f"filtered/{SHARD_GLOB}", "report.json", "settings.json")


@dataclass(frozen=True)
class ExpertDataRecipe:
    """What one run makes: the experts' recipe, prompts per subject and how they are rendered. A resumed run must
    use the same (only the subject count may change)."""

    expert: DreamBoothRecipe = field(default_factory=DreamBoothRecipe)
    prompts: int = 8
    demos: int = 3
    render_steps: int = 20  # DDIM steps of each render
    cfg: float = 4.0
    seed: int = 0


def pick_subjects(count: int, seed: int) -> list[int]:
    """The first `count` of a seeded permutation of the train split (a larger count keeps the smaller's picks)."""
    ids = np.random.default_rng(seed).permutation(subject_ids("train"))
    if count > len(ids):
        raise ValueError(f"{count} subjects asked, the train split has {len(ids)}")
    return [int(i) for i in ids[:count]]


def skill_context(skill: str, rng: np.random.Generator) -> Context:
    """A new context (background, position, scale drawn as the world does, no edit) with `skill`'s edit."""
    context, edit = sample_context(rng, p_edit=0.0), SKILL_EDITS[skill]
    if edit is None:
        return context
    name, values = edit
    return replace(context, **{name: values[int(rng.integers(len(values)))]})


def subject_prompts(subject_id: int, index: int, recipe: ExpertDataRecipe) -> list[tuple[str, str]]:
    """(skill, plain caption) of the `index`-th subject's prompts; skills cycle over the run so each gets ~1/6."""
    rng, skills = np.random.default_rng([recipe.seed, subject_id]), list(SKILLS)
    shape = subject_from_id(subject_id).shape
    out = []
    for j in range(recipe.prompts):
        skill = skills[(index * recipe.prompts + j) % len(skills)]
        context = skill_context(skill, rng)
        out.append((skill, caption_for(shape, context, int(rng.integers(2**31)))))
    return out


@torch.no_grad()
def render_expert(base: ExpertBase, prompts: list[str], steps: int, cfg: float, seed: int) -> np.ndarray:
    """The expert's renders of `prompts` (deterministic DDIM with CFG, seeded noise): uint8 (M, S, S, 3)."""
    base.unet.eval()
    settings = PriorSettings(count=len(prompts), steps=steps, cfg=cfg, seed=seed)
    latents = ddim_sample(base, base.text(prompts), base.text([""] * len(prompts)), settings)
    images = base.decode_latents(latents)  # (M, 3, S, S) in [-1, 1]
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class RunPaths:
    """Where a run's files go (see the module docstring)."""

    out: Path

    def record(self, subject: int) -> Path:
        return self.out / "subjects" / f"subject-{subject}.json"

    def expert(self, subject: int) -> Path:
        return self.out / "experts" / f"subject-{subject}.safetensors"

    def shard(self, folder: str, index: int) -> Path:
        return self.out / folder / f"shard-{index:06d}.tar"

    def own_files(self) -> list[Path]:
        return [p for pattern in OWN_FILES for p in sorted(self.out.glob(pattern))]


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write: a reader (or a resume) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1))


def write_subject_shards(paths: RunPaths, index: int, examples: list[SubjectExample], keep: list[bool]) -> None:
    """The subject's unfiltered and filtered shard, each written whole under a staging folder and then renamed."""
    for folder, chosen in (("unfiltered", examples), ("filtered", [e for e, k in zip(examples, keep) if k])):
        final = paths.shard(folder, index)
        with ShardWriter(paths.out / ".staging" / folder, max(1, len(chosen)), overwrite=True) as writer:
            for example in chosen:
                writer.write(example)
        final.parent.mkdir(parents=True, exist_ok=True)
        if writer.paths:
            os.replace(writer.paths[0], final)
        else:
            final.unlink(missing_ok=True)  # an unfinished earlier try of this subject may have kept some


def make_subject(subject_id: int, index: int, recipe: ExpertDataRecipe, base_path: Path, render_filter: RenderFilter,
                 paths: RunPaths, prior_cache: Path, device: torch.device | str = "cpu") -> dict:
    """Expert, renders, filter decisions and shards of one subject (trained and rendered on `device`); returns (and
    writes) its record."""
    base = load_expert_base(base_path, recipe.expert.identifier, device)
    demo_seed = int(np.random.default_rng([recipe.seed, subject_id, 1]).integers(2**31 - recipe.demos))
    trainer, seconds = fit_expert(base, subject_id, recipe.demos, replace(recipe.expert, seed=demo_seed), prior_cache)
    bytes_stored = trainer.save(paths.expert(subject_id))
    skills, prompts = zip(*subject_prompts(subject_id, index, recipe))
    named = [with_identifier(p, trainer.demos.class_word, recipe.expert.identifier) for p in prompts]
    start = time.perf_counter()
    images = render_expert(base, named, recipe.render_steps, recipe.cfg, demo_seed)
    render_seconds = time.perf_counter() - start
    demos = trainer.demos.renders
    decisions = render_filter.decide([to_tensor(list(demos.images))] * len(images), prompts, to_tensor(list(images)))
    full = np.ones(images.shape[1:3], dtype=bool)  # the render's subject mask is unknown
    examples = [SubjectExample(subject_id, demos.images, list(demos.masks), demos.captions, image, full, prompt)
                for image, prompt in zip(images, prompts)]
    write_subject_shards(paths, index, examples, [d.keep for d in decisions])
    record = {"subject": subject_id, "index": index, "class_word": trainer.demos.class_word,
              "expert": {"mode": recipe.expert.mode, "steps": trainer.steps, "seconds": seconds,
                         "prior_seconds": trainer.prior_seconds, "bytes": bytes_stored,
                         "path": str(paths.expert(subject_id))},
              "render_seconds": render_seconds,
              "renders": [{"skill": s, "prompt": p, "expert_prompt": n, **asdict(d)}
                          for s, p, n, d in zip(skills, prompts, named, decisions)]}
    write_json(paths.record(subject_id), record)
    return record


def failing_heads(renders: list[dict]) -> dict[str, dict[str, int]]:
    """Per drop reason, how often each head failed (from the decisions' details: "head: the render shows ...")."""
    out: dict[str, Counter] = {}
    for r in renders:
        if not r["keep"] and r["reason"] != "unreadable":
            out.setdefault(r["reason"], Counter()).update(part.split(":")[0] for part in r["detail"].split("; "))
    return {reason: dict(counts.most_common()) for reason, counts in out.items()}


def build_report(records: list[dict], settings: dict) -> dict:
    """Adaptation cost per subject and overall, keep rate overall and per skill, drop reasons and failing heads."""
    renders = [r for record in records for r in record["renders"]]
    decisions = [FilterDecision(r["keep"], r["reason"], r["detail"], r["scores"]) for r in renders]
    subjects = [{"subject": rec["subject"], "class_word": rec["class_word"], **{k: rec["expert"][k] for k in
                 ("steps", "seconds", "prior_seconds", "bytes")}, "render_seconds": rec["render_seconds"],
                 "kept": sum(r["keep"] for r in rec["renders"]), "renders": len(rec["renders"])} for rec in records]
    mean = (lambda key: float(np.mean([s[key] for s in subjects]))) if subjects else (lambda key: float("nan"))
    return {"settings": settings, "subjects": subjects,
            "adaptation": {"seconds_per_subject": mean("seconds"), "bytes_per_subject": mean("bytes"),
                           "render_seconds_per_subject": mean("render_seconds"), "subjects": len(subjects)},
            "filter": summarise(decisions, [r["prompt"] for r in renders]) | {"failing_heads": failing_heads(renders)}}


def prepare_out(paths: RunPaths, settings: dict, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an earlier run's output unless resuming it (same settings) or told to overwrite it."""
    existing = paths.own_files()
    if overwrite:
        for path in existing:
            path.unlink()
    elif existing and not resume:
        raise FileExistsError(f"{paths.out} already holds expert data ({len(existing)} files, e.g. "
                              f"{existing[0].relative_to(paths.out)}); pass --resume to continue that run or "
                              "--overwrite to start over")
    elif resume and (paths.out / "settings.json").is_file():
        changed = differing_settings(json.loads((paths.out / "settings.json").read_text()), settings)
        if changed:
            raise FileExistsError(f"{paths.out} holds a run with other settings ({', '.join(changed)} differ); "
                                  "resume it with its own settings, choose another --out, or pass --overwrite")
    shutil.rmtree(paths.out / ".staging", ignore_errors=True)
    write_json(paths.out / "settings.json", settings)


def run_settings(recipe: ExpertDataRecipe, base: Path, filter_path: Path) -> dict:
    """What a resumed run must share with the first: the recipe and the files it reads (not the subject count)."""
    return {**json.loads(json.dumps(asdict(recipe))), "base": str(base.resolve()), "filter": str(filter_path.resolve())}


def make_expert_data(out: Path, subjects: int, recipe: ExpertDataRecipe, base: Path = DEFAULT_BASE,
                     filter_path: Path = DEFAULT_FILTER, prior_cache: Path = DEFAULT_PRIOR_CACHE,
                     render_filter: RenderFilter | None = None, resume: bool = False,
                     overwrite: bool = False, device: torch.device | str = "cpu") -> dict:
    """Make (or with `resume` complete) the run's experts, renders and shards on `device` (not a setting: a run may
    resume on another); writes and returns the report. `render_filter` replaces the one loaded from `filter_path`
    (tests)."""
    paths, settings = RunPaths(out), run_settings(recipe, base, filter_path)
    prepare_out(paths, settings, resume, overwrite)
    render_filter = render_filter or RenderFilter.load(filter_path)
    records, picks = [], pick_subjects(subjects, recipe.seed)
    for index, subject_id in enumerate(picks):
        if paths.record(subject_id).is_file():
            records.append(json.loads(paths.record(subject_id).read_text()))
            print(f"[{index + 1}/{len(picks)}] subject {subject_id}: done before, skipped", file=sys.stderr, flush=True)
            continue
        records.append(make_subject(subject_id, index, recipe, base, render_filter, paths, prior_cache, device))
        print(f"[{index + 1}/{len(picks)}] " + progress_line(records[-1]), file=sys.stderr, flush=True)
    report = build_report(records, settings)
    write_json(out / "report.json", report)
    return report


def progress_line(record: dict) -> str:
    expert, renders = record["expert"], record["renders"]
    drops = Counter(r["reason"] for r in renders if not r["keep"])
    return (f"subject {record['subject']} ({record['class_word']}): {expert['mode']} expert {expert['steps']} steps "
            f"{expert['seconds']:.1f} s (+{expert['prior_seconds']:.1f} s class images), {expert['bytes']:,} bytes; "
            f"{len(renders)} renders {record['render_seconds']:.1f} s; kept {sum(r['keep'] for r in renders)}"
            f"/{len(renders)}" + (f" (drops: {dict(drops)})" if drops else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = ExpertDataRecipe()
    parser.add_argument("--out", type=Path, required=True, help="run folder (shards, experts, records, report)")
    parser.add_argument("--subjects", type=int, required=True, help="train-split subjects, one expert each")
    parser.add_argument("--prompts", type=int, default=recipe.prompts, help="new-context renders per expert")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="toy base .safetensors or diffusers folder")
    parser.add_argument("--filter", type=Path, default=DEFAULT_FILTER, help="render filter (train_judge --role filter)")
    parser.add_argument("--demos", type=int, default=recipe.demos, help="demo images per subject")
    add_recipe_arguments(parser)
    parser.add_argument("--render-steps", type=int, default=recipe.render_steps, help="DDIM steps per render")
    parser.add_argument("--cfg", type=float, default=recipe.cfg, help="classifier-free guidance of the renders")
    parser.add_argument("--seed", type=int, default=recipe.seed, help="subject pick, prompts, demos, render noise")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="skip the subjects an earlier run of --out finished")
    again.add_argument("--overwrite", action="store_true", help="delete --out's earlier run and start over")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = ExpertDataRecipe(recipe_from_args(args), args.prompts, args.demos, args.render_steps, args.cfg, args.seed)
    try:
        report = make_expert_data(args.out, args.subjects, recipe, args.base, args.filter, args.prior_cache,
                                  resume=args.resume, overwrite=args.overwrite, device=args.device)
    except FileExistsError as e:
        raise SystemExit(str(e)) from None
    f = report["filter"]
    print(f"{report['adaptation']['subjects']} experts, {report['adaptation']['seconds_per_subject']:.1f} s and "
          f"{report['adaptation']['bytes_per_subject']:,.0f} bytes each; kept {f['keep_rate']:.3f} of {f['n']} renders "
          f"(drops {f['drops']}); report {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
