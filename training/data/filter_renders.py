"""Stage `filter`: keep the expert renders that show their cluster's subject in the prompt's context, judged by the
render filter network (training/render_filter.RenderFilter, `--filter`, default models/filter/render_filter.safetensors;
never the evaluation judge models/eval/judge.safetensors, which only measures and is refused as a filter).

    python -m training.data filter --in ~/.cache/suti/experts --out ~/.cache/suti/filtered [--config filter.toml]

Per sample of the experts stage (training/data/experts.py) the filter sees the demos, the plain prompt
(`target_caption`) and the render (`target.png`) and keeps it, or drops it as the filter says: `unreadable` (its
mean confidence is below `min_confidence`), `wrong context` (a context head the prompt names, or an asked recolour,
gives the asked class less than `min_prob`) or `wrong subject` (an identity head the demos agree on gives their class
less than `min_prob`). A prompt outside the world's caption vocabulary cannot be checked: `prompt not readable`; a
sample whose images do not decode: `corrupt sample`. Thresholds: `--config` (TOML/JSON with min_prob,
min_confidence), then `--min-prob` / `--min-confidence`.

Output, per input shard a shard of the same name (none when nothing of it is kept) with the kept samples in the
experts stage's layout, every member's bytes as they were but the json's, which gains `"filter": {"identity",
"context", "confidence"}` (the lowest probability the filter gave an expected identity / context class, and its mean
confidence); `manifest.jsonl` (one line per input sample: `key`, `cluster`, `in_shard`, `out_shard`, `skill`,
`prompt`, `scores`, `detail` (the heads that failed and what each saw), `kept`, `reason`), `index/<shard>.jsonl`
(the scores, so a rerun never rescores a shard) and `summary.json` with the keep rate per skill.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from suti_core.eval.metrics import to_tensor

from ..render_filter import DEFAULT_FILTER, RenderFilter, parse_prompt
from ..shards import ShardSampleError, add_sample, decode_images, read_members, sample_locations, whole_shard
from .common import (INDEX_DIR, Backend, StageSummary, claim_output, finish_stage, input_shards, load_settings_file,
                     read_jsonl, run_tasks, shard_fingerprint, write_jsonl)

UNREADABLE_PROMPT, CORRUPT = "prompt not readable", "corrupt sample"
CHUNK = 64  # samples judged together: a shard's images never all sit in memory


@dataclass(frozen=True)
class FilterSettings:
    """The render filter's thresholds (training/render_filter.py): least probability of an expected class, least
    mean confidence."""

    min_prob: float = 0.1
    min_confidence: float = 0.7

    def __post_init__(self) -> None:
        for name in ("min_prob", "min_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a probability in [0, 1], got {getattr(self, name)}")


def load_filter_settings(config: Path | None, **overrides: float | None) -> FilterSettings:
    """Defaults, then the config file's values (TOML or JSON, the field names as keys), then explicit flags."""
    return load_settings_file(FilterSettings, config, overrides)


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


def judge_samples(samples: list[tuple[str, dict[str, bytes]]], shard: str,
                  render_filter: RenderFilter) -> list[dict[str, Any]]:
    """The manifest rows of (key, members) samples, in order: the filter's verdict where it can judge the sample."""
    rows: list[dict[str, Any] | None] = []
    judged: list[tuple[int, str, dict, Any, Any]] = []  # (row index, key, json, demos, render)
    for key, members in samples:
        meta = _json(members)
        try:
            demos, _, target, _ = decode_images(members, len(meta["demo_captions"]))
            prompt = str(meta["target_caption"])
        except (KeyError, TypeError, ShardSampleError):
            rows.append(_row(key, meta, shard, CORRUPT))
            continue
        try:
            parse_prompt(prompt)
        except ValueError:
            rows.append(_row(key, meta, shard, UNREADABLE_PROMPT))
            continue
        judged.append((len(rows), key, meta, demos, target))
        rows.append(None)
    if judged:
        decisions = render_filter.decide([to_tensor(list(demos)) for *_, demos, _ in judged],
                                         [meta["target_caption"] for _, _, meta, _, _ in judged],
                                         to_tensor([target for *_, target in judged]))
        for (i, key, meta, _, _), decision in zip(judged, decisions):
            rows[i] = _row(key, meta, shard, None if decision.keep else decision.reason, decision.scores,
                           decision.detail)
    return rows


def filter_shard(shard: Path, out: Path, filter_path: Path, settings: FilterSettings) -> list[dict[str, Any]]:
    """Score one input shard (or read its saved index), then write its kept samples unless that shard is whole."""
    saved, locations = out / INDEX_DIR / f"{shard.name}.jsonl", list(sample_locations(shard))
    if saved.exists():
        rows = read_jsonl(saved)
    else:
        render_filter = RenderFilter.load(filter_path, **asdict(settings))
        rows = []
        for start in range(0, len(locations), CHUNK):
            chunk = [(loc.key, read_members(loc)) for loc in locations[start:start + CHUNK]]
            rows += judge_samples(chunk, shard.name, render_filter)
        write_jsonl(saved, rows)
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
    """Kept / judged per prompt skill (the prompts stage's; a sample without json has none), skills in name order."""
    seen = Counter(row["skill"] for row in rows if row["skill"] is not None)
    kept = Counter(row["skill"] for row in rows if row["kept"])
    return {skill: round(kept[skill] / seen[skill], 4) for skill in sorted(seen)}


def filter_renders(experts: Path, out: Path, filter_path: Path = DEFAULT_FILTER,
                   settings: FilterSettings = FilterSettings(), workers: int | Backend = 1,
                   overwrite: bool = False) -> StageSummary:
    """Run the stage from `experts` (the experts stage's output) into `out`; returns its summary."""
    shards = input_shards(experts)
    RenderFilter.load(filter_path)  # a missing file or the judge fails here, before any work
    claim_output(out, {"stage": "filter", **asdict(settings), "filter": str(filter_path.resolve()),
                       "inputs": shard_fingerprint(shards)}, overwrite)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    task = partial(filter_shard, out=out, filter_path=filter_path, settings=settings)
    rows = [row for shard_rows in run_tasks(task, shards, workers, "filter") for row in shard_rows]
    return finish_stage(out, StageSummary("filter", notes={"keep_rate_per_skill": keep_rate_per_skill(rows)}), rows)
