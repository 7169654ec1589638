"""Stage `pack`: the filter stage's kept renders as the adapter trainer's shards (the seed's last step: apprenticeship
data the apprentice learns from), read by `python -m training.train_adapter --shards OUT --demos N`.

    python -m training.data pack --in ~/.cache/suti/filtered --out ~/.cache/suti/shards/crawl --demos 3 --size 128

Input: the filter (or experts) stage's shards, one sample per (cluster, prompt) in training/shards.py's image layout
(json with `cluster`, `skill`, `demo_captions`, `target_caption`; demo0.png.., optional demo masks, target.png,
optional target mask). Per sample, `--demos` of its demos (the cluster's images its expert learnt) are drawn without
replacement from (--seed, sample key) alone, kept in their order; a sample with fewer is dropped as `too few demos`
(every sample of a cluster smaller than N), one whose json or images do not decode as `corrupt sample`. Images are
cropped to their centred square and resized to `--size` (the trainer's base's image size, 128 for the toy base);
masks follow with nearest-neighbour resizing. A demo without a mask stays without one (the trainer reads that as
unknown); a target without one gets an all-True mask (as training/expert_shards.py: the trainer reads it only for
--subject-weight, where all-True makes the loss plain MSE).

The trainer's json needs `subject`, a world subject id, which a crawled cluster has none of: pack writes a stand-in
drawn from the cluster id (`stand_in_subject`); the trainer uses it for nothing but bookkeeping, and the json keeps
`cluster`, `skill`, `source_key` and `demos` (the chosen demo indexes) beside it. Output, per input shard a
`shard-*.tar` (the input's name, `shard-` prefixed if it lacks it; none when nothing is kept) whose samples keep
their input keys, `index/<shard>.jsonl` (the shard's manifest rows, written last: the shard is done),
`manifest.jsonl` (one line per input sample: `key`, `cluster`, `in_shard`, `out_shard`, `skill`, `demos`, `kept`,
`reason`) and `summary.json`.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from suti_core.world import NUM_SUBJECTS

from ..shards import (ShardSampleError, add_sample, decode_images, encode_images, read_members, sample_locations,
                      whole_shard)
from .common import (INDEX_DIR, Backend, StageSummary, claim_output, cluster_note, decode_image, finish_stage,
                     indexed_rows, input_shards, run_tasks, shard_fingerprint, square_image)

TOO_FEW, CORRUPT = "too few demos", "corrupt sample"


@dataclass(frozen=True)
class PackSettings:
    """Demos per sample (the trainer's --demos), image side (its base's) and the seed of the demo draw."""

    demos: int = 3  # train_adapter's default --demos
    size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.demos < 1:
            raise ValueError(f"--demos must be at least 1, got {self.demos}")
        if self.size < 8 or self.size % 8:
            raise ValueError(f"--size must be a positive multiple of 8 (the base's image size), got {self.size}")


def stand_in_subject(cluster: str) -> int:
    """A world subject id for the trainer's json, drawn from the cluster id alone (see the module docstring)."""
    return int(hashlib.sha256(cluster.encode()).hexdigest()[:15], 16) % NUM_SUBJECTS


def choose_demos(key: str, available: int, settings: PackSettings) -> list[int]:
    """`settings.demos` distinct demo indexes in order, drawn from (seed, sample key) alone."""
    rng = np.random.default_rng([settings.seed, int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)])
    return sorted(int(i) for i in rng.choice(available, settings.demos, replace=False))


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) uint8 image or (H, W) bool mask at size × size (the mask with nearest-neighbour)."""
    if image.shape[:2] == (size, size):
        return image
    if image.ndim == 3:
        return np.asarray(square_image(Image.fromarray(image), size))
    fitted = ImageOps.fit(Image.fromarray(image.astype(np.uint8) * 255), (size, size), Image.Resampling.NEAREST)
    return np.asarray(fitted) > 127


def with_target_mask(members: dict[str, bytes]) -> dict[str, bytes]:
    """The sample with an all-True target mask where its producer knew none (as training/expert_shards.py)."""
    target = None if "target.mask.png" in members else decode_image(members.get("target.png", b""))
    if target is None:
        return members
    buffer = io.BytesIO()
    Image.new("L", target.size, 255).save(buffer, format="PNG")
    return {**members, "target.mask.png": buffer.getvalue()}


def pack_sample(key: str, members: dict[str, bytes],
                settings: PackSettings) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """(the sample's `cluster`, `skill`, chosen `demos` and drop `reason`; the trainer's sample members, if kept)."""
    try:
        meta = json.loads(members["json"])
        captions = list(meta["demo_captions"])
        demos, masks, target, target_mask = decode_images(with_target_mask(members), len(captions))
        prompt, cluster = str(meta["target_caption"]), str(meta["cluster"])
    except (KeyError, TypeError, ValueError, ShardSampleError):
        return {"cluster": None, "skill": None, "demos": None, "reason": CORRUPT}, None
    fate = {"cluster": cluster, "skill": meta.get("skill"), "demos": None, "reason": TOO_FEW}
    if len(captions) < settings.demos:
        return fate, None
    chosen = choose_demos(key, len(captions), settings)
    size = settings.size
    images = encode_images(np.stack([_resized(demos[i], size) for i in chosen]),
                           [None if masks[i] is None else _resized(masks[i], size) for i in chosen],
                           _resized(target, size), _resized(target_mask, size))
    trainer_meta = {"subject": stand_in_subject(cluster), "demo_captions": [captions[i] for i in chosen],
                    "target_caption": prompt, "cluster": cluster, "skill": meta.get("skill"), "source_key": key,
                    "demos": chosen}
    return {**fate, "demos": chosen, "reason": None}, {"json": json.dumps(trainer_meta).encode(), **images}


def output_name(shard: Path) -> str:
    """The trainer globs `shard-*.tar`: an input named otherwise gets the prefix."""
    return shard.name if shard.name.startswith("shard-") else f"shard-{shard.name}"


def pack_rows(shard: Path, out: Path, settings: PackSettings) -> list[dict[str, Any]]:
    """Pack one input shard into its output shard (none if nothing is kept); returns its manifest rows."""
    rows, target = [], out / output_name(shard)
    with whole_shard(target) as tar:
        for location in sample_locations(shard):
            fate, members = pack_sample(location.key, read_members(location), settings)
            rows.append({"key": location.key, "cluster": fate["cluster"], "in_shard": shard.name,
                         "out_shard": target.name if members else None, "skill": fate["skill"],
                         "demos": fate["demos"], "kept": members is not None, "reason": fate["reason"]})
            if members is not None:
                add_sample(tar, location.key, members)
    if not any(row["kept"] for row in rows):
        target.unlink()
    return rows


def pack_shard(shard: Path, out: Path, settings: PackSettings) -> list[dict[str, Any]]:
    """One input shard's manifest rows; packed unless its index says a previous run did (the index is written
    after the shard, so it marks the shard done)."""
    return indexed_rows(out, shard, lambda: pack_rows(shard, out, settings))


def pack(filtered: Path, out: Path, settings: PackSettings = PackSettings(), workers: int | Backend = 1,
         overwrite: bool = False) -> StageSummary:
    """Run the stage from `filtered` (the filter stage's shards) into `out`; returns its summary."""
    shards = input_shards(filtered)
    claim_output(out, {"stage": "pack", **asdict(settings), "inputs": shard_fingerprint(shards)}, overwrite)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    task = partial(pack_shard, out=out, settings=settings)
    rows = [row for shard_rows in run_tasks(task, shards, workers, "pack") for row in shard_rows]
    notes = {"clusters": cluster_note(rows), "demos": settings.demos, "size": settings.size}
    return finish_stage(out, StageSummary("pack", notes=notes), rows)
