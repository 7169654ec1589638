"""Stage `prompts`: new-context prompts per subject cluster, the contexts its DreamBooth expert will render the subject
in (the seed's recontextualisation, stylisation, action, view, attribute and accessory skills).

    python -m training.data prompts --in ~/.cache/suti/clip --out ~/.cache/suti/prompts --per-cluster 12 \
        [--command "python my_llm.py"]

The class word of a cluster is the word of `--class-words` (one per line; default: the toy world's shapes) that
most of its captions name (ties: the list's order); a cluster whose captions name none is dropped as
`no class word in captions`. Templates: the i-th of `--per-cluster` prompts exercises skill i mod 6, written in the
world's caption vocabulary (`suti_core.world.caption_for` with the class word and a context that edits that skill),
drawn from (seed, cluster id) alone. `--command` (optional, e.g. a language model) runs once per cluster, without a
shell, with the cluster's captions on stdin one per line and SUTI_CLUSTER, SUTI_CLASS_WORD, SUTI_PROMPTS (how many
are wanted) in its environment; each non-empty stdout line is a prompt (`SKILL<TAB>prompt` names its skill; others
get `unspecified`), the first `--per-cluster` distinct ones are kept. Output per input shard: `shard-000000.jsonl`
(one line per prompt: `cluster`, `class_word`, `prompt`, `skill`, `source` template|command), `manifest.jsonl` (one
line per cluster: `cluster`, `in_shard`, `class_word`, `prompts`, `kept`, `reason`) and `summary.json`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from suti_core.world import Context, caption_for
from suti_core.world.context import ACCESSORIES, BACKGROUNDS, POSITIONS, RECOLORS, SCALES, STYLES
from suti_core.world.subjects import SHAPES

from ..shards import read_members, sample_locations
from .common import (Backend, StageSummary, claim_output, finish_stage, input_shards, read_jsonl, run_tasks,
                     shard_fingerprint, write_jsonl)

SKILLS = ("recontext", "stylize", "action", "view", "attribute", "accessory")
NO_CLASS_WORD = "no class word in captions"


class PromptCommandError(RuntimeError):
    """The external prompt command failed; the message names the cluster, the exit status and stderr."""


@dataclass(frozen=True)
class PromptSettings:
    """How many prompts per cluster (templates, and at most as many from the command), the seed, the class words
    and the external command (None: templates only)."""

    per_cluster: int = 12
    seed: int = 0
    class_words: tuple[str, ...] = SHAPES
    command: str | None = None
    command_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.per_cluster < 1:
            raise ValueError(f"--per-cluster must be at least 1, got {self.per_cluster}")
        if not self.class_words:
            raise ValueError("the class-word list is empty; give --class-words a file with one word per line")


def read_class_words(path: Path | None) -> tuple[str, ...]:
    """The class vocabulary: one word (or phrase) a line, `#` comments skipped; None gives the world's shapes."""
    if path is None:
        return SHAPES
    if not path.is_file():
        raise FileNotFoundError(f"no class-word file {path}; write one class word per line, or leave --class-words "
                                "out for the toy world's shapes")
    return tuple(w.strip().lower() for w in path.read_text().splitlines() if w.strip() and not w.startswith("#"))


def class_word(captions: list[str], vocabulary: tuple[str, ...]) -> str | None:
    """The vocabulary word most captions name (whole words; ties go to the earlier word), None if none does."""
    counts = Counter(word for caption in captions for word in vocabulary
                     if re.search(rf"\b{re.escape(word)}\b", caption.lower()))
    return max(vocabulary, key=lambda w: (counts[w], -vocabulary.index(w))) if counts else None


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def skill_context(skill: str, rng: np.random.Generator) -> tuple[Context, bool]:
    """A context that exercises `skill` on a plain photo in a new place, and whether the prompt states the view."""
    base = Context(background=_pick(BACKGROUNDS, rng))
    edits = {"recontext": {}, "stylize": {"style": _pick(STYLES[1:], rng)}, "action": {"state": "upside_down"},
             "view": {"position": _pick(POSITIONS, rng), "scale": _pick(SCALES, rng)},
             "attribute": {"recolor": _pick(RECOLORS[1:], rng)},
             "accessory": {"accessory": _pick(ACCESSORIES[1:], rng)}}  # every pick drawn: the stream stays aligned
    return Context(**{**asdict(base), **edits[skill]}), skill == "view"


def template_prompts(cluster: str, word: str, settings: PromptSettings) -> list[dict[str, Any]]:
    """`per_cluster` distinct prompts, skills in turn, drawn from (seed, cluster id) alone: the same whatever shard
    or worker the cluster lands in."""
    rng = np.random.default_rng([settings.seed, int(hashlib.sha256(cluster.encode()).hexdigest()[:15], 16)])
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in range(settings.per_cluster):
        skill = SKILLS[i % len(SKILLS)]
        for _ in range(20):  # the world's vocabulary is finite: after 20 repeats a repeat is accepted
            context, view = skill_context(skill, rng)
            prompt = caption_for(word, context, variant=int(rng.integers(1 << 16)), pose=view)
            if prompt not in seen:
                break
        seen.add(prompt)
        rows.append({"cluster": cluster, "class_word": word, "prompt": prompt, "skill": skill, "source": "template"})
    return rows


def command_prompts(cluster: str, word: str, captions: list[str], settings: PromptSettings) -> list[dict[str, Any]]:
    """The external command's prompts for one cluster; PromptCommandError if it cannot run or fails."""
    env = {**os.environ, "SUTI_CLUSTER": cluster, "SUTI_CLASS_WORD": word, "SUTI_PROMPTS": str(settings.per_cluster)}
    fix = "fix the command, or leave --command out for templates only"
    try:
        done = subprocess.run(shlex.split(settings.command), input="".join(c + "\n" for c in captions), text=True,
                              capture_output=True, env=env, timeout=settings.command_timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PromptCommandError(f"the prompt command {settings.command!r} could not run for cluster {cluster} "
                                 f"({e}); {fix}") from None
    if done.returncode != 0:
        raise PromptCommandError(f"the prompt command {settings.command!r} exited with status {done.returncode} "
                                 f"for cluster {cluster}; its stderr ends: {done.stderr.strip()[-500:]!r}; {fix}")
    rows, seen = [], set()
    for line in done.stdout.splitlines():
        skill, tab, prompt = line.strip().partition("\t")
        skill, prompt = (skill, prompt.strip()) if tab and skill in SKILLS else ("unspecified", line.strip())
        if prompt and prompt not in seen and len(rows) < settings.per_cluster:
            seen.add(prompt)
            rows.append({"cluster": cluster, "class_word": word, "prompt": prompt, "skill": skill,
                         "source": "command"})
    return rows


def prompt_shard(shard: Path, out: Path, settings: PromptSettings) -> list[dict[str, Any]]:
    """One input shard's prompts (read back if a previous run wrote them whole); returns its manifest rows."""
    target = out / f"{shard.stem}.jsonl"
    saved = read_jsonl(target) if target.exists() else None
    manifest, prompts = [], []
    for location in sample_locations(shard):
        meta = json.loads(read_members(location)["json"])
        captions = [image["caption"] for image in meta["images"]]
        word = class_word(captions, settings.class_words)
        rows = []
        if word is not None and saved is None:
            rows = template_prompts(meta["cluster"], word, settings)
            rows += command_prompts(meta["cluster"], word, captions, settings) if settings.command else []
        elif word is not None:
            rows = [row for row in saved if row["cluster"] == meta["cluster"]]
        prompts += rows
        manifest.append({"cluster": meta["cluster"], "in_shard": shard.name, "class_word": word,
                         "prompts": len(rows), "kept": word is not None, "reason": None if word else NO_CLASS_WORD})
    if saved is None:
        write_jsonl(target, prompts)
    return manifest


def write_prompts(clusters: Path, out: Path, settings: PromptSettings = PromptSettings(),
                  workers: int | Backend = 1, overwrite: bool = False) -> StageSummary:
    """Run the stage from `clusters` (cluster or clip-filter shards) into `out`; returns its summary."""
    shards = input_shards(clusters)
    claim_output(out, {"stage": "prompts", **asdict(settings), "class_words": list(settings.class_words),
                       "inputs": shard_fingerprint(shards)}, overwrite)
    rows = [row for shard_rows in run_tasks(partial(prompt_shard, out=out, settings=settings), shards, workers,
                                            "prompts") for row in shard_rows]
    return finish_stage(out, StageSummary("prompts", notes={"prompts": sum(row["prompts"] for row in rows)}), rows)
