"""Stage `recaption`: replace each crawled image's alt text with a captioner's description (the seed's recaptioning:
alt text is noisy and rarely says what the picture shows; the trainer learns from the captions this stage writes).

    python -m training.data recaption --in ~/.cache/suti/clip --out ~/.cache/suti/recaption --model DIR
    python -m training.data recaption --in ~/.cache/suti/clip --out ~/.cache/suti/recaption \
        --command "python -m training.data.toy_captioner"

The captioner is a local transformers image-to-text model (`--model`) or an external command (`--command`), see
`captioners.py`; it sees one input shard's images at once. Per image the json entry's `caption` becomes the
captioner's and `alt_text` keeps the crawl's (the first one, if the images were recaptioned before). An image is
dropped as `corrupt image` (never sent to the captioner) or `empty caption`; then a cluster left with fewer than
`min_size` images drops them all as `cluster too small after recaptioning`. Output: per input shard (cluster or
clip-filter layout) one shard of the same name in that layout with the kept images renumbered (none when nothing is
kept), `index/<shard>.jsonl` (the captions, so a rerun never recaptions a shard), `manifest.jsonl` (one line per
input image: `key`, `source_shard`, `cluster`, `in_shard`, `out_shard`, `caption`, `alt_text`, `kept`, `reason`) and
`summary.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..shards import read_members, sample_locations
from .captioners import CaptionRequest, Captioner
from .common import (INDEX_DIR, Backend, StageSummary, claim_output, cluster_note, decode_image, finish_stage,
                     image_member, indexed_rows, input_shards, run_tasks, shard_fingerprint, write_kept)

EMPTY, CORRUPT, TOO_SMALL = "empty caption", "corrupt image", "cluster too small after recaptioning"


@dataclass(frozen=True)
class RecaptionSettings:
    """The fewest images a recaptioned cluster keeps."""

    min_size: int = 3

    def __post_init__(self) -> None:
        if self.min_size < 1:
            raise ValueError(f"--min-size must be at least 1, got {self.min_size}")


def image_rows(members: dict[str, bytes], shard: str) -> tuple[list[dict[str, Any]], list[CaptionRequest]]:
    """One cluster sample's manifest rows (captions still to come) and the requests for its decodable images."""
    meta = json.loads(members["json"])
    rows, requests = [], []
    for i, image in enumerate(meta["images"]):
        member = image_member(members, i)
        usable = decode_image(members[member]) is not None
        rows.append({"key": image["key"], "source_shard": image.get("source_shard"), "cluster": meta["cluster"],
                     "in_shard": shard, "out_shard": None, "index": i, "caption": None,
                     "alt_text": image.get("alt_text", image["caption"]), "kept": False,
                     "reason": None if usable else CORRUPT})
        if usable:
            requests.append(CaptionRequest(meta["cluster"], image["key"], members[member], member.partition(".")[2]))
    return rows, requests


def judge_cluster(rows: list[dict[str, Any]], settings: RecaptionSettings) -> None:
    """Set each image's reason and fate in place, once its caption is known."""
    for row in rows:
        row["reason"] = row["reason"] or (EMPTY if not row["caption"] else None)
    small = sum(row["reason"] is None for row in rows) < settings.min_size
    for row in rows:
        row["reason"] = TOO_SMALL if small and row["reason"] is None else row["reason"]
        row["kept"] = row["reason"] is None
        row["out_shard"] = row["in_shard"] if row["kept"] else None


def caption_shard(shard: Path, captioner: Captioner, settings: RecaptionSettings) -> list[dict[str, Any]]:
    """Every image row of one input shard, captioned and judged (one captioner call for the shard)."""
    clusters, requests = [], []
    for location in sample_locations(shard):
        rows, cluster_requests = image_rows(read_members(location), shard.name)
        clusters.append(rows)
        requests += cluster_requests
    captions = iter(captioner.caption(shard.name, requests))
    for rows in clusters:
        for row in rows:
            row["caption"] = next(captions) if row["reason"] is None else None
        judge_cluster(rows, settings)
    return [row for rows in clusters for row in rows]


def recaptioned_entry(entry: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A kept image's json entry with the captioner's caption and the crawl's alt text."""
    return {**entry, "caption": row["caption"], "alt_text": row["alt_text"]}


def recaption_shard(shard: Path, out: Path, captioner: Captioner, settings: RecaptionSettings) -> list[dict[str, Any]]:
    """Caption one input shard (or read its saved index), then write its output shard unless already whole."""
    rows = indexed_rows(out, shard, lambda: caption_shard(shard, captioner, settings))
    write_kept(shard, out, rows, recaptioned_entry)
    return rows


def recaption(clusters: Path, out: Path, captioner: Captioner, settings: RecaptionSettings = RecaptionSettings(),
              workers: int | Backend = 1, overwrite: bool = False) -> StageSummary:
    """Run the stage from `clusters` (cluster or clip-filter shards) into `out`; returns its summary."""
    shards = input_shards(clusters)
    captioner.check()
    claim_output(out, {"stage": "recaption", "min_size": settings.min_size, "captioner": captioner.fingerprint(),
                       "inputs": shard_fingerprint(shards)}, overwrite)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    task = partial(recaption_shard, out=out, captioner=captioner, settings=settings)
    rows = [row for shard_rows in run_tasks(task, shards, workers, "recaption", captioner.gpus_per_task())
            for row in shard_rows]
    return finish_stage(out, StageSummary("recaption", notes={"clusters": cluster_note(rows)}), rows)
