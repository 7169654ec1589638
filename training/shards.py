"""WebDataset shards of adapter-training examples, so the trainer reads the same examples whichever producer
wrote them (the renderer now, per-subject DreamBooth experts later).

A shard is a plain tar file `shard-000000.tar`; a sample is a run of contiguous members sharing a key (the
file name up to its first dot), the layout `webdataset` reads:

    000123.json             {"subject": 123, "demo_captions": [...], "target_caption": "..."}
    000123.demo0.png        demo photo 0 (RGB); demo1.png ... up to the number of demo captions
    000123.demo0.mask.png   optional: demo 0's exact subject mask (L, 255 = subject)
    000123.target.png       the target: the same subject in a new context (RGB), captioned by target_caption
    000123.target.mask.png  where the target shows the subject (L)

A corrupt or incomplete sample is skipped with a logged reason naming its shard and key; the rest are read.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from suti_core.world import NUM_SUBJECTS

from .examples import SubjectBatch, SubjectExample, collate

log = logging.getLogger(__name__)
SHARD_GLOB = "shard-*.tar"


class ShardSampleError(ValueError):
    """A sample that cannot be read: a member missing, truncated or undecodable."""


# -- writing -------------------------------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_images(demo_images: np.ndarray, demo_masks: list[np.ndarray | None], target_image: np.ndarray,
                  target_mask: np.ndarray) -> dict[str, bytes]:
    """A sample's image members (demos, their masks where known, target, its mask) as PNG, in write order: the
    layout every producer of demo/target samples shares (the data stages write their own json beside it)."""
    members = {}
    for i, (image, mask) in enumerate(zip(demo_images, demo_masks, strict=True)):
        members[f"demo{i}.png"] = _png(image)
        if mask is not None:
            members[f"demo{i}.mask.png"] = _png(mask.astype(np.uint8) * 255)
    members["target.png"] = _png(target_image)
    members["target.mask.png"] = _png(target_mask.astype(np.uint8) * 255)
    return members


def encode_example(example: SubjectExample) -> dict[str, bytes]:
    """A sample's members by extension, in the order they are written."""
    meta = {"subject": example.subject, "demo_captions": example.demo_captions,
            "target_caption": example.target_caption}
    return {"json": json.dumps(meta).encode()} | encode_images(example.demo_images, example.demo_masks,
                                                               example.target_image, example.target_mask)


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """Append one sample's members as `KEY.EXT`, in `members`' order; mtime 0 and no owner, so the same samples
    give the same bytes."""
    for extension, data in members.items():
        info = tarfile.TarInfo(f"{key}.{extension}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def partial_path(shard: Path) -> Path:
    """Where `shard` is written until it is whole (readers glob `*.tar` and never see it)."""
    return shard.with_name(shard.name + ".partial")


@contextmanager
def whole_shard(shard: Path) -> Iterator[tarfile.TarFile]:
    """A tar written under `shard`'s `.partial` name and renamed to `shard` only when the block ends cleanly, so a
    kill or an error mid-shard never leaves a half shard looking complete."""
    tar = tarfile.open(partial_path(shard), "w", format=tarfile.USTAR_FORMAT)
    try:
        yield tar
    except BaseException:
        tar.close()
        partial_path(shard).unlink(missing_ok=True)
        raise
    tar.close()
    os.replace(partial_path(shard), shard)


class ShardWriter:
    """Writes examples as `per_shard`-sample shards under `out`, keys numbered from 0 in write order. A shard is
    written under a `.partial` name and renamed when full or at close, so readers only ever see whole shards."""

    def __init__(self, out: Path, per_shard: int, overwrite: bool = False):
        if per_shard < 1:
            raise ValueError(f"samples per shard must be at least 1, got {per_shard}")
        existing = sorted(out.glob(SHARD_GLOB))
        if existing and not overwrite:
            raise FileExistsError(f"{out} already holds {len(existing)} shards ({existing[0].name}, ...); pass "
                                  "--overwrite (overwrite=True) to replace them or choose another --out")
        for path in existing + sorted(out.glob(SHARD_GLOB + ".partial")):
            path.unlink()  # a shorter rewrite must not leave stale shards to be read with the new ones
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.per_shard, self.count, self.paths = out, per_shard, 0, []
        self._tar: tarfile.TarFile | None = None

    def _next_path(self) -> Path:
        return self.out / f"shard-{len(self.paths):06d}.tar"

    def _partial(self) -> Path:
        return partial_path(self._next_path())

    def write(self, example: SubjectExample) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self._partial(), "w", format=tarfile.USTAR_FORMAT)
        add_sample(self._tar, f"{self.count:06d}", encode_example(example))
        self.count += 1
        if self.count % self.per_shard == 0:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._partial(), self._next_path())
            self.paths.append(self._next_path())
            self._tar = None

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written."""
        self._finish_shard()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # a failed run leaves only whole shards behind
            self._tar.close()
            self._partial().unlink()


# -- reading -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleLocation:
    """Where a sample lies: its shard, key, and each member's (data offset, size) in that tar."""

    shard: Path
    key: str
    members: dict[str, tuple[int, int]]


def shard_paths(directory: Path) -> list[Path]:
    """The shards of `directory` in name order (the reading order)."""
    paths = sorted(directory.glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(f"no {SHARD_GLOB} in {directory}; write some with "
                                f"`python -m training.write_shards --out {directory}`")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): the key is the path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, extension


def sample_locations(shard: Path) -> Iterator[SampleLocation]:
    """The samples of one shard in tar order; an unreadable rest of the shard is logged and ends it."""
    current: SampleLocation | None = None
    try:
        with tarfile.open(shard) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, extension = _split_name(info.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = SampleLocation(shard, key, {})
                current.members[extension] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        log.warning("shard %s is unreadable after key %s (%s); reading the samples before it",
                    shard, current.key if current else "none", e)
    if current is not None:
        yield current


def read_members(location: SampleLocation) -> dict[str, bytes]:
    """A sample's member bytes by extension."""
    members = {}
    with open(location.shard, "rb") as f:
        for extension, (offset, size) in location.members.items():
            f.seek(offset)
            members[extension] = f.read(size)
            if len(members[extension]) != size:
                raise ShardSampleError(f"{extension} is truncated ({len(members[extension])} of {size} bytes)")
    return members


def _member(members: dict[str, bytes], extension: str) -> bytes:
    if extension not in members:
        raise ShardSampleError(f"{extension} is missing (members: {', '.join(sorted(members))})")
    return members[extension]


def _image(members: dict[str, bytes], extension: str, mode: str) -> np.ndarray:
    data = _member(members, extension)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            return np.asarray(image.convert(mode))
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports some broken PNG chunks as SyntaxError
        raise ShardSampleError(f"{extension} is not a readable PNG ({e})") from None


def _metadata(members: dict[str, bytes]) -> dict:
    try:
        meta = json.loads(_member(members, "json"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
        raise ShardSampleError(f"json is not valid JSON ({e})") from None
    captions = meta.get("demo_captions") if isinstance(meta, dict) else None
    if not (isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions)
            and isinstance(meta.get("target_caption"), str) and isinstance(meta.get("subject"), int)
            and 0 <= meta["subject"] < NUM_SUBJECTS):
        raise ShardSampleError(f"json needs subject (id below {NUM_SUBJECTS}), demo_captions (a non-empty list of "
                               f"strings) and target_caption (a string); it holds {str(meta)[:200]}")
    return meta


def decode_images(members: dict[str, bytes], n_demos: int) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray,
                                                                   np.ndarray]:
    """(demos (n, S, S, 3), their masks or None, target (S, S, 3), its mask) from `encode_images`' members;
    ShardSampleError if one is missing, unreadable or of another size."""
    demos = [_image(members, f"demo{i}.png", "RGB") for i in range(n_demos)]
    masks = [_image(members, f"demo{i}.mask.png", "L") > 127 if f"demo{i}.mask.png" in members else None
             for i in range(n_demos)]
    target, target_mask = _image(members, "target.png", "RGB"), _image(members, "target.mask.png", "L") > 127
    sizes = {a.shape[:2] for a in demos + [m for m in masks if m is not None] + [target, target_mask]}
    if len(sizes) != 1:
        raise ShardSampleError(f"images and masks differ in size: {sorted(sizes)}")
    return np.stack(demos), masks, target, target_mask


def decode_example(members: dict[str, bytes]) -> SubjectExample:
    """The example a sample's members hold; ShardSampleError says what is wrong with a bad one."""
    meta = _metadata(members)
    demos, masks, target, target_mask = decode_images(members, len(meta["demo_captions"]))
    return SubjectExample(meta["subject"], demos, masks, meta["demo_captions"], target, target_mask,
                          meta["target_caption"])


def iter_examples(directory: Path) -> Iterator[tuple[SampleLocation, SubjectExample]]:
    """Every readable sample of `directory`'s shards, shards in name order and samples in tar order; a bad one
    is skipped with a logged reason."""
    for shard in shard_paths(directory):
        for location in sample_locations(shard):
            try:
                example = decode_example(read_members(location))
            except ShardSampleError as e:
                log.warning("skipping sample %s of shard %s: %s", location.key, shard, e)
                continue
            yield location, example


def _fits(location: SampleLocation, example: SubjectExample, n_demos: int, size: int) -> bool:
    """Whether an example has the run's demo count and image size (logged when not)."""
    found = (len(example.demo_captions), example.target_image.shape[0])
    if found != (n_demos, size):
        log.warning("skipping sample %s of shard %s: %d demos at %dpx, the run needs %d at %dpx",
                    location.key, location.shard, *found, n_demos, size)
    return found == (n_demos, size)


class ShardSampler:
    """Examples drawn from shards instead of the renderer. The valid samples are indexed once, at start; each pick
    from that index uses `rng` alone, so (the trainer seeding `rng` per example) a step's examples depend only on
    (seed, step, index in the step) and a resumed run over the same shards draws what an unbroken one did."""

    def __init__(self, directory: Path, n_demos: int, size: int, rng: np.random.Generator):
        self.locations = [loc for loc, example in iter_examples(directory) if _fits(loc, example, n_demos, size)]
        if not self.locations:
            raise ValueError(f"no readable sample in {directory} has {n_demos} demos at {size}px (the log says why "
                             f"each was skipped); write some with `python -m training.write_shards --out DIR "
                             f"--demos {n_demos}` (toy base) or `python -m training.data pack ... --demos {n_demos} "
                             f"--size {size}`")
        self.rng = rng

    def examples(self, count: int) -> list[SubjectExample]:
        """`count` examples picked from the index with `self.rng`."""
        picks = self.rng.choice(len(self.locations), count)
        return [decode_example(read_members(self.locations[int(i)])) for i in picks]

    def batch(self, batch_size: int) -> SubjectBatch:
        return collate(self.examples(batch_size))
