"""Stage `filter`: keep the expert renders that show their cluster's subject in the prompt's context, scored by one
of two scorers: the toy world's render filter network (training/render_filter.RenderFilter, `--filter`, the default
models/filter/render_filter.safetensors), or for real data an open_clip model (`--clip DIR`, loaded as the
clip-filter stage loads it). Never the evaluation judge, which only measures: the render filter loader takes only
a file `train_judge --role filter` wrote, and `--clip` only an open_clip model.

    python -m training.data filter --in ~/.cache/suti/experts --out ~/.cache/suti/filtered [--config filter.toml]
    python -m training.data filter --in ~/.cache/suti/experts --out ~/.cache/suti/filtered --clip DIR [--device cuda]

Per sample of the experts stage (training/data/experts.py) the scorer sees the demos, the plain prompt
(`target_caption`) and the render (`target.png`) and keeps it, or drops it with a reason; a sample whose images do
not decode: `corrupt sample`.
- The render filter: `unreadable` (its mean confidence is below `min_confidence`), `wrong context` (a context head the
  prompt names, or an asked recolour, gives the asked class less than `min_prob`) or `wrong subject` (an identity
  head the demos agree on gives their class less than `min_prob`). A prompt outside the world's caption vocabulary
  cannot be checked: `prompt not readable`. Scores `{"identity", "context", "confidence"}`: the lowest probability it
  gave an expected identity / context class, and its mean confidence.
- CLIP (the seed's filter): scores `{"subject", "text"}`, the render's mean cosine to its demos and its cosine to
  its prompt (4 decimals, which the thresholds compare); `wrong subject` below `clip_subject`, else `wrong context`
  below `clip_text`. The defaults are starting points for a ViT-B-32-class model: tune them on a hand-labelled sample
  of renders (the seed keeps about 20-30 %).
Thresholds: `--config` (TOML/JSON with min_prob, min_confidence, clip_subject, clip_text), then the flags.

Output, per input shard a shard of the same name (none when nothing of it is kept) with the kept samples in the
experts stage's layout, every member's bytes as they were but the json's, which gains `"filter"`: the scores;
`manifest.jsonl` (one line per input sample: `key`, `cluster`, `in_shard`, `out_shard`, `skill`, `prompt`, `scores`,
`detail` (what failed and what was seen), `kept`, `reason`), `index/<shard>.jsonl` (the scores, so a rerun never
rescores a shard) and `summary.json` with the keep rate per skill. The settings a rerun must match name the scorer
and its model: a rerun with the other scorer needs `--overwrite`.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from suti_core.eval.metrics import to_tensor

from ..render_filter import DEFAULT_FILTER, RenderFilter, parse_prompt
from ..shards import SampleLocation, ShardSampleError, add_sample, decode_images, read_members, sample_locations, whole_shard
from .clip_filter import GPUS_PER_TASK, ClipModel, clip_embeddings, load_clip
from .common import (INDEX_DIR, Backend, StageSummary, claim_output, finish_stage, indexed_rows, input_shards,
                     load_settings_file, run_tasks, shard_fingerprint)

UNREADABLE_PROMPT, CORRUPT = "prompt not readable", "corrupt sample"
WRONG_SUBJECT, WRONG_CONTEXT = "wrong subject", "wrong context"  # the render filter's reasons, given by CLIP too
CHUNK = 64  # samples scored together: a shard's images never all sit in memory
Decoded = tuple[np.ndarray, str, np.ndarray]  # demos (n, S, S, 3), plain prompt, render (S, S, 3); uint8 RGB
Verdict = tuple[str | None, dict[str, float] | None, str]  # drop reason (None: kept), scores, detail


@dataclass(frozen=True)
class FilterSettings:
    """Both scorers' thresholds: the render filter's (training/render_filter.py) least probability of an expected
    class and least mean confidence; CLIP's least cosine of the render to its demos and to its prompt (starting
    points for a ViT-B-32-class model, to tune on a hand-labelled sample)."""

    min_prob: float = 0.1
    min_confidence: float = 0.7
    clip_subject: float = 0.80
    clip_text: float = 0.30

    def __post_init__(self) -> None:
        for name in ("min_prob", "min_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("clip_subject", "clip_text"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a cosine similarity in [-1, 1], "
                                 f"got {getattr(self, name)}")


def load_filter_settings(config: Path | None, **overrides: float | None) -> FilterSettings:
    """Defaults, then the config file's values (TOML or JSON, the field names as keys), then explicit flags."""
    return load_settings_file(FilterSettings, config, overrides)


@dataclass(frozen=True)
class NetworkScorer:
    """The toy world's render filter network at `path`: its identity and context heads score each render."""

    path: Path = DEFAULT_FILTER

    @property
    def gpus_per_task(self) -> float:
        return 0  # a small CNN: its Ray tasks run on CPUs

    def check(self) -> None:
        RenderFilter.load(self.path)  # a missing file or one that is not a render filter fails here, before any work

    def settings(self, settings: FilterSettings) -> dict[str, Any]:
        """What a rerun must match: the scorer, its thresholds and its file."""
        return {"scorer": "render filter", "min_prob": settings.min_prob, "min_confidence": settings.min_confidence,
                "filter": str(self.path.resolve())}

    def verdicts(self, settings: FilterSettings) -> Callable[[list[Decoded]], list[Verdict]]:
        """The verdicts of chunks of samples, the network loaded once."""
        return partial(network_verdicts, RenderFilter.load(self.path, min_prob=settings.min_prob,
                                                           min_confidence=settings.min_confidence))


def network_verdicts(render_filter: RenderFilter, samples: list[Decoded]) -> list[Verdict]:
    """The render filter's verdict where it can read the prompt, else `prompt not readable`."""
    verdicts: list[Verdict] = [(UNREADABLE_PROMPT, None, "")] * len(samples)
    readable = [i for i, (_, prompt, _) in enumerate(samples) if _readable(prompt)]
    if readable:
        decisions = render_filter.decide([to_tensor(list(samples[i][0])) for i in readable],
                                         [samples[i][1] for i in readable],
                                         to_tensor([samples[i][2] for i in readable]))
        for i, decision in zip(readable, decisions):
            verdicts[i] = (None if decision.keep else decision.reason, decision.scores, decision.detail)
    return verdicts


def _readable(prompt: str) -> bool:
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ClipScorer:
    """An open_clip model (loaded as the clip-filter stage loads it): the render's cosine to its demos and prompt."""

    model: ClipModel

    @property
    def gpus_per_task(self) -> float:
        return GPUS_PER_TASK if self.model.device.startswith("cuda") else 0

    def check(self) -> None:
        load_clip(self.model)  # a missing file, or one that is no open_clip model, fails here, before any work

    def settings(self, settings: FilterSettings) -> dict[str, Any]:
        """What a rerun must match: the scorer, its thresholds and its model's files."""
        return {"scorer": "clip", "clip_subject": settings.clip_subject, "clip_text": settings.clip_text,
                "clip": [str(self.model.path.resolve()), self.model.fingerprint()]}

    def verdicts(self, settings: FilterSettings) -> Callable[[list[Decoded]], list[Verdict]]:
        return partial(clip_verdicts, self.model, settings)


def clip_verdicts(spec: ClipModel, settings: FilterSettings, samples: list[Decoded]) -> list[Verdict]:
    """Per sample, `subject` (the render's mean cosine to its demos) and `text` (its cosine to its plain prompt),
    4 decimals, and the verdict they give. One batch per chunk: the distinct demos first, then the renders."""
    demo_images, demo_rows = distinct_demos(samples)
    image, text = clip_embeddings(spec, demo_images + [Image.fromarray(render) for *_, render in samples],
                                  [prompt for _, prompt, _ in samples])
    demos, renders = image[:len(demo_images)], image[len(demo_images):]  # (distinct demos, D), (N, D)
    subject = [float((demos[rows] @ render).mean()) for rows, render in zip(demo_rows, renders)]
    own_prompt = (renders * text).sum(-1).tolist()  # (N,)
    return [clip_verdict(round(s, 4), round(t, 4), settings) for s, t in zip(subject, own_prompt)]


def distinct_demos(samples: list[Decoded]) -> tuple[list[Image.Image], list[list[int]]]:
    """The samples' distinct demo images and each sample's rows among them: a cluster's renders share their demos,
    which are embedded once."""
    rows: dict[tuple[tuple[int, ...], bytes], int] = {}  # (shape, pixels) -> row
    images: list[Image.Image] = []
    for demos, _, _ in samples:
        for demo in demos:
            if rows.setdefault((demo.shape, demo.tobytes()), len(images)) == len(images):
                images.append(Image.fromarray(demo))
    return images, [[rows[(demo.shape, demo.tobytes())] for demo in demos] for demos, _, _ in samples]


def clip_verdict(subject: float, text: float, settings: FilterSettings) -> Verdict:
    """CLIP's scores to a verdict (the tests recompute verdicts with this rule): subject first, then context."""
    scores = {"subject": subject, "text": text}
    if subject < settings.clip_subject:
        return WRONG_SUBJECT, scores, f"cosine to the demos {subject} < clip_subject {settings.clip_subject}"
    if text < settings.clip_text:
        return WRONG_CONTEXT, scores, f"cosine to the prompt {text} < clip_text {settings.clip_text}"
    return None, scores, ""


Scorer = NetworkScorer | ClipScorer


def as_scorer(scorer: Path | ClipModel) -> Scorer:
    """A render filter file, or an open_clip model, as the scorer that decides with it."""
    return ClipScorer(scorer) if isinstance(scorer, ClipModel) else NetworkScorer(Path(scorer))


def _json(members: dict[str, bytes]) -> dict[str, Any]:
    """The sample's json, or {} when it is missing or broken."""
    try:
        meta = json.loads(members["json"])
    except (KeyError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _row(key: str, meta: dict[str, Any], shard: str, reason: str | None, scores: dict | None = None,
         detail: str = "") -> dict[str, Any]:
    return {"key": key, "cluster": meta.get("cluster"), "in_shard": shard, "out_shard": shard if reason is None else None,
            "skill": meta.get("skill"), "prompt": meta.get("target_caption"), "scores": scores, "detail": detail,
            "kept": reason is None, "reason": reason}


def score_samples(samples: list[tuple[str, dict[str, bytes]]], shard: str,
                  verdicts: Callable[[list[Decoded]], list[Verdict]]) -> list[dict[str, Any]]:
    """The manifest rows of (key, members) samples, in order: the scorer's verdict on each one that decodes."""
    rows: list[dict[str, Any] | None] = []
    scored: list[tuple[int, str, dict, Decoded]] = []  # (row index, key, json, decoded)
    for key, members in samples:
        meta = _json(members)
        try:
            demos, _, target, _ = decode_images(members, len(meta["demo_captions"]))
            scored.append((len(rows), key, meta, (demos, str(meta["target_caption"]), target)))
            rows.append(None)
        except (KeyError, TypeError, ShardSampleError):
            rows.append(_row(key, meta, shard, CORRUPT))
    if scored:
        for (i, key, meta, _), (reason, scores, detail) in zip(scored, verdicts([d for *_, d in scored])):
            rows[i] = _row(key, meta, shard, reason, scores, detail)
    return rows


def score_renders(locations: list[SampleLocation], shard: str, scorer: Scorer,
                  settings: FilterSettings) -> list[dict[str, Any]]:
    """Every sample's manifest row, scored `CHUNK` samples at a time."""
    verdicts, rows = scorer.verdicts(settings), []
    for start in range(0, len(locations), CHUNK):
        chunk = [(location.key, read_members(location)) for location in locations[start:start + CHUNK]]
        rows += score_samples(chunk, shard, verdicts)
    return rows


def filter_shard(shard: Path, out: Path, scorer: Scorer, settings: FilterSettings) -> list[dict[str, Any]]:
    """Score one input shard (or read its saved index), then write its kept samples unless that shard is whole."""
    locations = list(sample_locations(shard))
    rows = indexed_rows(out, shard, lambda: score_renders(locations, shard.name, scorer, settings))
    target = out / shard.name
    if any(row["kept"] for row in rows) and not target.exists():
        with whole_shard(target) as tar:
            for location, row in zip(locations, rows):
                if row["kept"]:
                    members = read_members(location)
                    meta = {**json.loads(members["json"]), "filter": row["scores"]}
                    add_sample(tar, location.key, {**members, "json": json.dumps(meta).encode()})
    return rows


def keep_rate_per_skill(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Kept / scored per prompt skill (the prompts stage's; a sample without json has none), skills in name order."""
    seen = Counter(row["skill"] for row in rows if row["skill"] is not None)
    kept = Counter(row["skill"] for row in rows if row["kept"])
    return {skill: round(kept[skill] / seen[skill], 4) for skill in sorted(seen)}


def filter_renders(experts: Path, out: Path, scorer: Path | ClipModel = DEFAULT_FILTER,
                   settings: FilterSettings = FilterSettings(), workers: int | Backend = 1,
                   overwrite: bool = False) -> StageSummary:
    """Run the stage from `experts` (the experts stage's output) into `out`, scored by the render filter file or
    the open_clip model `scorer`; returns its summary."""
    shards, scorer = input_shards(experts), as_scorer(scorer)
    scorer.check()
    claim_output(out, {"stage": "filter", **scorer.settings(settings), "inputs": shard_fingerprint(shards)}, overwrite)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    task = partial(filter_shard, out=out, scorer=scorer, settings=settings)
    rows = [row for shard_rows in run_tasks(task, shards, workers, "filter", scorer.gpus_per_task)
            for row in shard_rows]
    return finish_stage(out, StageSummary("filter", notes={"keep_rate_per_skill": keep_rate_per_skill(rows)}), rows)
