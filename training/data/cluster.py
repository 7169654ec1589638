"""Stage `cluster`: group crawled image–text pairs into subject clusters by their normalised source page, the seed's
first step (a product page's photos mostly show one subject; clip-filter later drops the clusters where they don't).

    python -m training.data cluster --in ~/.cache/suti/crawl --out ~/.cache/suti/clusters --min-size 3 --max-size 10

Three passes. (1) index, per input shard in parallel: check each sample (json, fields, decodable image, caption),
hash its image bytes, normalise its page URL; each shard's index is saved as `index/<shard>.jsonl` (atomically), so
a rerun skips indexed shards. (2) group, in one process: per page, drop repeated image bytes, then whole pages outside
[min, max] images. (3) write, per output shard in parallel: one WebDataset sample per cluster, key = cluster id:

    c0123456789abcdef.json      {"cluster", "page", "images": [{"key", "source_shard", "url", "caption",
                                 "width", "height", "sha256"}, ...]}   (images in crawl order)
    c0123456789abcdef.img0.jpg  the first image's bytes as crawled (png/webp keep theirs), img1.jpg, ...

Clusters are ordered by id (a hash of the page, so shards mix sites) and `--clusters-per-shard` go in each
`shard-000000.tar`, written as `.partial` and renamed when whole; a whole one is skipped on rerun.
`manifest.jsonl` has one line per input sample in crawl order: `key`, `source_shard`, `page`, `cluster`,
`out_shard`, `kept`, `reason` (null when kept); `summary.json` the counts.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from ..shards import SampleLocation, ShardSampleError, add_sample, read_members, sample_locations, whole_shard
from .common import (IMAGE_EXTENSIONS, INDEX_DIR, Backend, StageSummary, claim_output, finish_stage, indexed_rows,
                     input_shards, run_tasks, shard_fingerprint)



@dataclass(frozen=True)
class ClusterSettings:
    """Cluster size bounds (after duplicates are dropped), the json field naming the source page, shard size."""

    min_size: int = 3
    max_size: int = 10
    page_field: str = "page_url"
    clusters_per_shard: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"cluster size bounds need 1 <= --min-size <= --max-size, "
                             f"got {self.min_size}..{self.max_size}")
        if self.clusters_per_shard < 1:
            raise ValueError(f"--clusters-per-shard must be at least 1, got {self.clusters_per_shard}")


def normalise_page_url(url: str) -> str:
    """One spelling per page: host lowercased without `www.` (and without a default port), path without trailing
    slash; scheme, query and fragment dropped (http/https and tracking parameters show the same page)."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").removeprefix("www.")
    port = f":{parts.port}" if parts.port not in (None, 80, 443) else ""
    return f"{host}{port}{parts.path.rstrip('/')}"


def cluster_id(page: str) -> str:
    """A cluster's id from its normalised page alone: stable across runs, crawls and shard layouts."""
    return "c" + hashlib.sha256(page.encode()).hexdigest()[:16]


def _image_extension(members: dict[str, bytes]) -> str | None:
    return next((e for e in IMAGE_EXTENSIONS if e in members), None)


def _decodes(data: bytes) -> bool:
    """Whether the bytes are a whole image Pillow can decode (a truncated file fails too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Pillow's DecompressionBombWarning: the stage decides, not a log
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def check_sample(members: dict[str, bytes], page_field: str) -> tuple[str | None, dict[str, Any]]:
    """(drop reason or None, the sample's json): the checks every later stage relies on, cheapest first."""
    if "json" not in members:
        return "missing json", {}
    try:
        meta = json.loads(members["json"])
    except ValueError:
        return "corrupt json", {}
    if not isinstance(meta, dict):
        return "corrupt json", {}
    for name in dict.fromkeys(("url", page_field, "width", "height")):
        if meta.get(name) in (None, ""):
            return f"missing field: {name}", meta
    extension = _image_extension(members)
    if extension is None:
        return "missing image", meta
    if not _decodes(members[extension]):
        return "corrupt image", meta
    if "txt" not in members:
        return "missing caption", meta
    return None, meta


def index_sample(location: SampleLocation, page_field: str) -> dict[str, Any]:
    """A sample's index row: where its members lie, its page, image hash and drop reason (None if usable)."""
    row: dict[str, Any] = {"key": location.key, "source_shard": location.shard.name,
                           "members": {e: list(span) for e, span in location.members.items()},
                           "page": None, "sha256": None, "reason": None}
    try:
        members = read_members(location)
    except ShardSampleError:
        return {**row, "reason": "truncated sample"}
    row["reason"], meta = check_sample(members, page_field)
    if row["reason"] is None:
        row["page"] = normalise_page_url(str(meta[page_field]))
        row["sha256"] = hashlib.sha256(members[_image_extension(members)]).hexdigest()
    return row


def index_shard(shard: Path, out: Path, page_field: str) -> list[dict[str, Any]]:
    """Pass 1 for one input shard: its index rows, read back if a previous run saved them."""
    return indexed_rows(out, shard, lambda: [index_sample(location, page_field) for location in sample_locations(shard)])


def group_clusters(rows: list[dict[str, Any]], settings: ClusterSettings) -> dict[str, list[dict[str, Any]]]:
    """Pass 2: usable rows grouped by page in crawl order; repeated image bytes within a page and pages outside the
    size bounds get their reason in `rows`. Returns the kept clusters by id, ids in sorted order."""
    pages: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["reason"] is None:
            pages.setdefault(row["page"], []).append(row)
    clusters = {}
    for page, members in pages.items():
        seen: set[str] = set()
        for row in members:
            if row["sha256"] in seen:
                row["reason"] = "duplicate image"
            seen.add(row["sha256"])
        unique = [row for row in members if row["reason"] is None]
        too = "small" if len(unique) < settings.min_size else "large" if len(unique) > settings.max_size else None
        for row in unique:
            row["reason"] = f"cluster too {too}" if too else None
        if too is None:
            clusters[cluster_id(page)] = unique
    return dict(sorted(clusters.items()))


def cluster_members(cluster: str, rows: list[dict[str, Any]], crawl: Path) -> dict[str, bytes]:
    """One cluster's WebDataset sample: json first, then its images as crawled."""
    images, files = [], {}
    for i, row in enumerate(rows):
        location = SampleLocation(crawl / row["source_shard"], row["key"],
                                  {e: tuple(span) for e, span in row["members"].items()})
        members = read_members(location)
        meta, extension = json.loads(members["json"]), _image_extension(members)
        images.append({"key": row["key"], "source_shard": row["source_shard"], "url": meta["url"],
                       "caption": members["txt"].decode("utf-8", "replace").strip(), "width": meta["width"],
                       "height": meta["height"], "sha256": row["sha256"]})
        files[f"img{i}.{extension}"] = members[extension]
    meta = {"cluster": cluster, "page": rows[0]["page"], "images": images}
    return {"json": json.dumps(meta).encode(), **files}


def write_cluster_shard(task: tuple[Path, list[tuple[str, list[dict[str, Any]]]]], crawl: Path) -> Path:
    """Pass 3 for one output shard, unless it is already whole (a rerun resumes)."""
    path, clusters = task
    if not path.exists():
        with whole_shard(path) as tar:
            for cluster, rows in clusters:
                add_sample(tar, cluster, cluster_members(cluster, rows, crawl))
    return path


def _shard_tasks(clusters: dict[str, list[dict[str, Any]]], out: Path, per_shard: int) -> Iterator[tuple[Path, list]]:
    items = list(clusters.items())
    for s in range(0, len(items), per_shard):
        yield out / f"shard-{s // per_shard:06d}.tar", items[s:s + per_shard]


def cluster_crawl(crawl: Path, out: Path, settings: ClusterSettings = ClusterSettings(),
                  workers: int | Backend = 1, overwrite: bool = False) -> StageSummary:
    """Run the stage from `crawl` (img2dataset shards) into `out`; returns its summary (also in summary.json)."""
    shards = input_shards(crawl)
    claim_output(out, {"stage": "cluster", **asdict(settings), "inputs": shard_fingerprint(shards)}, overwrite)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    index = partial(index_shard, out=out, page_field=settings.page_field)
    indexed = run_tasks(index, shards, workers, "cluster: index")
    rows = [row for shard_rows in indexed for row in shard_rows]
    clusters = group_clusters(rows, settings)
    tasks = list(_shard_tasks(clusters, out, settings.clusters_per_shard))
    out_shard = {cluster: path.name for path, items in tasks for cluster, _ in items}
    run_tasks(partial(write_cluster_shard, crawl=crawl), tasks, workers, "cluster: write")
    manifest = []
    for row in rows:
        cluster = cluster_id(row["page"]) if row["reason"] is None else None
        manifest.append({"key": row["key"], "source_shard": row["source_shard"], "page": row["page"],
                         "cluster": cluster, "out_shard": out_shard.get(cluster), "kept": row["reason"] is None,
                         "reason": row["reason"]})
    return finish_stage(out, StageSummary("cluster", notes={"clusters": len(clusters), "shards": len(tasks)}), manifest)
