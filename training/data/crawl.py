"""A synthetic web crawl from the procedural world, in img2dataset's layout, with noise at known rates: the data the
pipeline's stages are proved on, since each sample's truth (subject, context, injected fault) is known.

    python -m training.data synth-crawl --out ~/.cache/suti/crawl --pages 200 --seed 0

A page is a product page (`https://shop-N.example/item/P`, written with varying case, `www.`, query, fragment and
trailing slash) showing 3–6 photos of one subject in different contexts, each with its alt text from `caption_for`.
Shards `00000.tar`, ... hold `KEY.jpg`, `KEY.txt` (alt text) and `KEY.json` (`url`, `page_url`, `key`, `status`,
`width`, `height`, as img2dataset writes with `page_url` saved as an additional column); samples are shuffled
across shards as a real crawl's are. `ground_truth.jsonl` has one line per sample: its page, subject, noise kind
(or null) and what each stage is expected to do with it; `synth_crawl.json` the rates and counts.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from suti_core.world import NUM_SUBJECTS, Context, caption_for, render, sample_context, subject_from_id
from suti_core.world.subjects import SHAPES

from ..shards import add_sample, whole_shard
from .common import Backend, claim_output, run_tasks, write_atomic, write_jsonl

MISSABLE_FIELDS = ("url", "page_url", "width", "height")


@dataclass(frozen=True)
class NoiseRates:
    """How often each fault occurs: page kinds per page, the rest per ordinary page (at most once each)."""

    singleton_page: float = 0.05      # a page with one image: too small a cluster
    catalogue_page: float = 0.03      # a page of 12–16 different subjects: too large a cluster
    mismatched_caption: float = 0.10  # one image's alt text names another shape and context
    unrelated_image: float = 0.10     # one extra image of another subject (truthfully captioned)
    duplicate_url: float = 0.08       # one image listed twice: same url, same bytes
    corrupt_image: float = 0.05       # one extra image whose bytes are truncated or garbage
    missing_field: float = 0.05       # one extra image whose json lacks url, page_url, width or height


@dataclass(frozen=True)
class CrawlItem:
    """One planned sample: what to render, what to write about it, and which fault (if any) it carries."""

    page: int
    page_url: str
    url: str
    subject: int
    context: Context
    render_seed: int
    caption: str
    noise: str | None = None
    detail: str | None = None  # the missing field, or the corruption ("truncated" / "garbage")


def _page_url_variant(host: str, page: int, rng: np.random.Generator) -> str:
    """The page's URL as one link to it might spell it; `cluster` normalises all spellings to one."""
    scheme = "https" if rng.random() < 0.7 else "http"
    host = ("www." if rng.random() < 0.3 else "") + (host.upper() if rng.random() < 0.2 else host)
    url = f"{scheme}://{host}/item/{page}" + ("/" if rng.random() < 0.3 else "")
    url += f"?ref=feed-{int(rng.integers(100))}" if rng.random() < 0.4 else ""
    return url + (f"#img{int(rng.integers(10))}" if rng.random() < 0.2 else "")


def _other_subject(subject: int, rng: np.random.Generator) -> int:
    return (subject + 1 + int(rng.integers(NUM_SUBJECTS - 1))) % NUM_SUBJECTS


def _photo(page: int, host: str, index: int, subject: int, rng: np.random.Generator, p_edit: float) -> CrawlItem:
    """A truthfully captioned photo of `subject` on `page`, in a fresh context."""
    context = sample_context(rng, p_edit)
    caption = caption_for(subject_from_id(subject), context, variant=int(rng.integers(1 << 16)))
    return CrawlItem(page, _page_url_variant(host, page, rng), f"https://cdn.{host}/img/{page}/{index}.jpg", subject,
                     context, int(rng.integers(1 << 31)), caption)


def plan_page(seed: int, page: int, rates: NoiseRates, p_edit: float) -> list[CrawlItem]:
    """Page `page`'s samples, drawn from (seed, page) alone: the same page whatever else the crawl holds."""
    rng = np.random.default_rng([seed, page])
    host, subject, kind = f"shop-{int(rng.integers(1000))}.example", int(rng.integers(NUM_SUBJECTS)), rng.random()
    if kind < rates.singleton_page:
        return [replace(_photo(page, host, 0, subject, rng, p_edit), noise="singleton page")]
    if kind < rates.singleton_page + rates.catalogue_page:
        subjects = rng.choice(NUM_SUBJECTS, int(rng.integers(12, 17)), replace=False)
        return [replace(_photo(page, host, i, int(s), rng, p_edit), noise="catalogue page")
                for i, s in enumerate(subjects)]
    items = [_photo(page, host, i, subject, rng, p_edit) for i in range(int(rng.integers(3, 7)))]
    mismatched, duplicated = (int(i) for i in rng.choice(len(items), 2, replace=False))
    if rng.random() < rates.mismatched_caption:
        shape = SHAPES[(SHAPES.index(subject_from_id(subject).shape) + 1 + int(rng.integers(len(SHAPES) - 1)))
                       % len(SHAPES)]
        caption = caption_for(shape, sample_context(rng, p_edit), variant=int(rng.integers(1 << 16)))
        items[mismatched] = replace(items[mismatched], caption=caption, noise="mismatched caption")
    extra = []
    if rng.random() < rates.unrelated_image:
        extra.append(replace(_photo(page, host, len(items) + len(extra), _other_subject(subject, rng), rng, p_edit),
                             noise="unrelated image"))
    if rng.random() < rates.duplicate_url:
        extra.append(replace(items[duplicated], page_url=_page_url_variant(host, page, rng), noise="duplicate url"))
    if rng.random() < rates.corrupt_image:
        extra.append(replace(_photo(page, host, len(items) + len(extra), subject, rng, p_edit), noise="corrupt image",
                             detail=("truncated", "garbage")[int(rng.integers(2))]))
    if rng.random() < rates.missing_field:
        extra.append(replace(_photo(page, host, len(items) + len(extra), subject, rng, p_edit), noise="missing field",
                             detail=MISSABLE_FIELDS[int(rng.integers(len(MISSABLE_FIELDS)))]))
    return items + extra


def expected_cluster_reason(noise: str | None, detail: str | None) -> str | None:
    """What `cluster` (default bounds 3..10) must do with a sample: None to keep it, or its drop reason. Faults it
    cannot see (a mismatched caption, an unrelated image) are kept here and left to clip-filter."""
    if noise == "missing field":
        return f"missing field: {detail}"
    return {"corrupt image": "corrupt image", "duplicate url": "duplicate image", "singleton page": "cluster too small",
            "catalogue page": "cluster too large"}.get(noise or "")


def encode_image(item: CrawlItem, size: int, image_format: str) -> bytes:
    """The item's render as file bytes, faulty where the item says so (deterministic either way)."""
    buffer = io.BytesIO()
    image = Image.fromarray(render(subject_from_id(item.subject), item.context, size, item.render_seed))
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    data = buffer.getvalue()
    if item.detail == "truncated":
        return data[: len(data) // 3]
    if item.detail == "garbage":
        return np.random.default_rng(item.render_seed).bytes(len(data))
    return data


def sample_members(key: str, item: CrawlItem, size: int, image_format: str) -> dict[str, bytes]:
    """The members img2dataset writes for one sample: image, alt text, json."""
    meta: dict[str, Any] = {"url": item.url, "page_url": item.page_url, "key": key, "status": "success",
                            "width": size, "height": size}
    if item.noise == "missing field":
        del meta[item.detail]
    return {image_format: encode_image(item, size, image_format), "txt": item.caption.encode(),
            "json": json.dumps(meta).encode()}


def crawl_key(index: int, per_shard: int) -> str:
    """img2dataset's key: shard number (5 digits) then the position in the shard (4 digits)."""
    return f"{index // per_shard:05d}{index % per_shard:04d}"


def write_crawl_shard(task: tuple[Path, list[tuple[str, CrawlItem]]], size: int, image_format: str) -> Path:
    """Render and write one shard unless it is already whole (a rerun resumes)."""
    path, items = task
    if not path.exists():
        with whole_shard(path) as tar:
            for key, item in items:
                add_sample(tar, key, sample_members(key, item, size, image_format))
    return path


def plan_crawl(pages: int, seed: int, rates: NoiseRates, p_edit: float) -> list[CrawlItem]:
    """Every page's samples, shuffled across the crawl with the seed (a crawl does not keep a page together)."""
    items = [item for page in range(pages) for item in plan_page(seed, page, rates, p_edit)]
    order = np.random.default_rng([seed, pages, 1]).permutation(len(items))
    return [items[int(i)] for i in order]


def ground_truth_rows(items: list[CrawlItem], per_shard: int) -> list[dict[str, Any]]:
    """One line per sample: key, page, subject, noise, and the cluster stage's expected verdict (the first copy
    of a duplicated image, in crawl order, is the one kept)."""
    rows, seen = [], set()
    for index, item in enumerate(items):
        noise = item.noise
        if noise == "duplicate url" or (item.page, item.url) in seen:  # the later copy is the duplicate
            noise = "duplicate url" if (item.page, item.url) in seen else None
        seen.add((item.page, item.url))
        rows.append({"key": crawl_key(index, per_shard), "page": item.page, "subject": item.subject,
                     "noise": noise, "detail": item.detail,
                     "expect": {"cluster": expected_cluster_reason(noise, item.detail) or "kept"}})
    return rows


def synth_crawl(out: Path, pages: int, seed: int = 0, per_shard: int = 1000, size: int = 128,
                image_format: str = "jpg", p_edit: float = 0.15, rates: NoiseRates = NoiseRates(),
                workers: int | Backend = 1, overwrite: bool = False) -> dict[str, Any]:
    """Write the crawl and its ground truth under `out`; returns the run's summary (also in synth_crawl.json)."""
    if not 1 <= per_shard <= 10_000:
        raise ValueError(f"--per-shard must be in [1, 10000] (img2dataset's 4-digit in-shard key), got {per_shard}")
    settings = {"stage": "synth-crawl", "pages": pages, "seed": seed, "per_shard": per_shard, "size": size,
                "format": image_format, "p_edit": p_edit, "rates": asdict(rates)}
    claim_output(out, settings, overwrite)
    items = plan_crawl(pages, seed, rates, p_edit)
    keyed = [(crawl_key(i, per_shard), item) for i, item in enumerate(items)]
    tasks = [(out / f"{s:05d}.tar", keyed[s * per_shard:(s + 1) * per_shard])
             for s in range(-(-len(keyed) // per_shard))]
    truth = ground_truth_rows(items, per_shard)
    write_jsonl(out / "ground_truth.jsonl", truth)
    run_tasks(partial(write_crawl_shard, size=size, image_format=image_format), tasks, workers, "synth-crawl")
    summary = {**settings, "samples": len(items), "shards": len(tasks),
               "noise": dict(sorted(Counter(row["noise"] or "clean" for row in truth).items())),
               "expect_cluster": dict(sorted(Counter(row["expect"]["cluster"] for row in truth).items()))}
    write_atomic(out / "synth_crawl.json", json.dumps(summary, indent=1) + "\n")
    return summary
