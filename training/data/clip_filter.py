"""Stage `clip-filter`: keep the images of a cluster that show its subject and match their caption, scored by an
open_clip model from a local checkpoint (the seed's strict CLIP filter; it drops most crawled clusters).

    python -m training.data clip-filter --in ~/.cache/suti/clusters --out ~/.cache/suti/clip --model DIR

`--model` is a folder in open_clip's local layout (`open_clip_config.json` with `model_cfg`, and its weights, e.g.
`open_clip_model.safetensors`: any open_clip repo on the Hugging Face hub, fetched with `huggingface-cli download`),
or a weights file together with `--model-name` (an open_clip architecture such as `ViT-B-32`). Nothing is downloaded.

Per image: `image_image`, the mean cosine similarity of its embedding to the other images of its cluster, and
`image_text`, the cosine similarity to its own caption (both rounded to 4 decimals, which the thresholds compare).
An image below `image_image` is dropped as `off-subject image`, else below `image_text` as `caption mismatch`
(one pass: an off-subject image still counts in its neighbours' means); then clusters left with fewer than
`min_size` images drop them all as `cluster too small after filtering`. Output: per input shard one shard of the
same name in the cluster layout (kept images renumbered img0.., each image's json entry gains `clip` scores),
`manifest.jsonl` (one line per input image: `key`, `source_shard`, `cluster`, `in_shard`, `out_shard`,
`image_image`, `image_text`, `kept`, `reason`), `index/<shard>.jsonl` (the scores, so a rerun never rescores a
shard) and `summary.json`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..shards import read_members, sample_locations
from .common import (INDEX_DIR, Backend, StageSummary, as_backend, claim_output, cluster_note, decode_image,
                     finish_stage, image_member, indexed_rows, input_shards, load_settings_file, run_tasks,
                     shard_fingerprint, write_kept)

if TYPE_CHECKING:
    import torch

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS_EXTENSIONS = ("safetensors", "bin", "pth")  # what open_clip's local-dir loader looks for
OFF_SUBJECT, MISMATCH, TOO_SMALL = "off-subject image", "caption mismatch", "cluster too small after filtering"
GPUS_PER_TASK = 0.25  # on cuda, what a Ray task asks for: a ViT-B-32-class model lets four share a GPU


@dataclass(frozen=True)
class ClipFilterSettings:
    """Thresholds (cosine similarities; starting points for a ViT-B-32-class model, to tune on a labelled sample)
    and the cluster size a filtered cluster must keep."""

    image_image: float = 0.80
    image_text: float = 0.25
    min_size: int = 3

    def __post_init__(self) -> None:
        for name in ("image_image", "image_text"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a cosine similarity in [-1, 1], "
                                 f"got {getattr(self, name)}")
        if self.min_size < 1:
            raise ValueError(f"--min-size must be at least 1, got {self.min_size}")


def load_settings(config: Path | None, **overrides: float | None) -> ClipFilterSettings:
    """Defaults, then the config file's values (TOML or JSON, the field names as keys), then explicit flags."""
    return load_settings_file(ClipFilterSettings, config, overrides)


@dataclass(frozen=True)
class ClipModel:
    """Where the model comes from: a checkpoint file + architecture name, or an open_clip folder (name None); `flag`
    is the stage's option that names it (`--model`, the filter stage's `--clip`), for the messages."""

    path: Path
    name: str | None = None
    device: str = "cpu"
    flag: str = field(default="--model", compare=False)

    def check(self) -> None:
        """Fail before any work, saying how to get a usable checkpoint."""
        fetch = ("fetch one, e.g. `huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K --local-dir DIR`, "
                 f"and pass {self.flag} DIR")
        if not self.path.exists():
            raise FileNotFoundError(f"no open_clip checkpoint at {self.path}; {fetch}")
        if self.path.is_dir() and not (self.path / OPEN_CLIP_CONFIG).is_file():
            raise FileNotFoundError(f"{self.path} has no {OPEN_CLIP_CONFIG}; point {self.flag} at a weights file and "
                                    f"name its architecture with {self.flag}-name (e.g. ViT-B-32), or {fetch}")
        if self.path.is_dir() and not any(next(self.path.glob(f"*.{e}"), None) for e in WEIGHTS_EXTENSIONS):
            # open_clip would only log a warning and score with random weights
            raise FileNotFoundError(f"{self.path} has {OPEN_CLIP_CONFIG} but no weights file (*.safetensors, *.bin, "
                                    f"*.pth) beside it; copy the weights in, or {fetch}")
        if self.path.is_file() and self.name is None:
            raise ValueError(f"{self.path} is a weights file: name its open_clip architecture with {self.flag}-name "
                             f"(e.g. ViT-B-32; open_clip.list_models() lists them), or point {self.flag} at a folder "
                             f"with {OPEN_CLIP_CONFIG} beside the weights")

    def fingerprint(self) -> list[Any]:
        """Name and size of every weights file: a rerun with another checkpoint must not resume this one's run."""
        files = sorted(self.path.iterdir()) if self.path.is_dir() else [self.path]
        return [self.name] + [[f.name, f.stat().st_size] for f in files if f.is_file()]


_LOADED: dict[ClipModel, tuple[Any, Any, Any]] = {}


def load_clip(spec: ClipModel) -> tuple[Any, Any, Any]:
    """(model in eval mode, image transform, tokenizer), once per process: workers load their own copy."""
    if spec not in _LOADED:
        import open_clip  # the `train` extra; imported here so the other stages run without it

        spec.check()
        name = spec.name if spec.name is not None else f"local-dir:{spec.path}"
        pretrained = str(spec.path) if spec.name is not None else None
        try:
            model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=spec.device)
        except RuntimeError as error:  # weights of another network: open_clip's state-dict mismatch
            raise ValueError(f"{spec.path} does not hold an open_clip {spec.name or 'model'} ({str(error)[:120]}...); "
                             f"pass {spec.flag} an open_clip folder or its weights file with {spec.flag}-name") from None
        _LOADED[spec] = (model.eval(), transform, open_clip.get_tokenizer(name))
    return _LOADED[spec]


def clip_embeddings(spec: ClipModel, images: list[Image.Image], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length image (N, D) and text (M, D) embeddings in one batch each: cosines are their dot products. Also
    the filter stage's (training/data/filter_renders.py), so both stages score with the same model path."""
    import torch

    model, transform, tokenizer = load_clip(spec)
    with torch.no_grad():
        pixels = torch.stack([transform(image) for image in images]).to(spec.device)  # (N, 3, H, W)
        image = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)  # (N, D)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(texts).to(spec.device)).float(), dim=-1)
    return image, text  # (N, D), (M, D)


def score_images(spec: ClipModel, images: list[Image.Image], captions: list[str]) -> list[tuple[float | None, float]]:
    """(mean cosine to the cluster's other images or None when alone, cosine to its caption) per image, 4 decimals.
    One batch per cluster, so an image's scores do not depend on which shard or worker it lands in."""
    image, text = clip_embeddings(spec, images, captions)
    similarity = image @ image.T  # (N, N)
    n = len(images)
    others = ((similarity.sum(1) - similarity.diagonal()) / max(n - 1, 1)).tolist()
    own_caption = (image * text).sum(-1).tolist()  # (N,)
    return [(round(o, 4) if n > 1 else None, round(t, 4)) for o, t in zip(others, own_caption)]


def verdict(image_image: float | None, image_text: float | None, settings: ClipFilterSettings) -> str | None:
    """An image's drop reason from its scores (None: kept so far); the test recomputes it with this rule."""
    if image_text is None:
        return "corrupt image"
    if image_image is not None and image_image < settings.image_image:
        return OFF_SUBJECT
    return MISMATCH if image_text < settings.image_text else None


def filter_cluster(members: dict[str, bytes], shard: str, spec: ClipModel,
                   settings: ClipFilterSettings) -> list[dict[str, Any]]:
    """One cluster sample's manifest rows: scores and verdicts for each of its images, in order."""
    meta = json.loads(members["json"])
    images = [decode_image(members[image_member(members, i)]) for i in range(len(meta["images"]))]
    usable = [i for i, image in enumerate(images) if image is not None]
    scores = dict(zip(usable, score_images(spec, [images[i] for i in usable],
                                           [meta["images"][i]["caption"] for i in usable]))) if usable else {}
    rows = []
    for i, image in enumerate(meta["images"]):
        image_image, image_text = scores.get(i, (None, None))
        rows.append({"key": image["key"], "source_shard": image.get("source_shard"), "cluster": meta["cluster"],
                     "in_shard": shard, "out_shard": None, "index": i, "image_image": image_image,
                     "image_text": image_text, "kept": False,
                     "reason": verdict(image_image, image_text, settings)})
    small = sum(row["reason"] is None for row in rows) < settings.min_size
    for row in rows:
        row["reason"] = TOO_SMALL if small and row["reason"] is None else row["reason"]
        row["kept"] = row["reason"] is None
        row["out_shard"] = shard if row["kept"] else None
    return rows


def scored_entry(entry: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A kept image's json entry with its `clip` scores."""
    return {**entry, "clip": {"image_image": row["image_image"], "image_text": row["image_text"]}}


def score_shard(shard: Path, spec: ClipModel, settings: ClipFilterSettings) -> list[dict[str, Any]]:
    """Every image row of one input shard, scored and judged."""
    return [row for location in sample_locations(shard)
            for row in filter_cluster(read_members(location), shard.name, spec, settings)]


def filter_shard(shard: Path, out: Path, spec: ClipModel, settings: ClipFilterSettings) -> list[dict[str, Any]]:
    """Score one input shard (or read its saved index), then write its output shard unless already whole."""
    rows = indexed_rows(out, shard, lambda: score_shard(shard, spec, settings))
    write_kept(shard, out, rows, scored_entry)
    return rows


def clip_filter(clusters: Path, out: Path, spec: ClipModel, settings: ClipFilterSettings = ClipFilterSettings(),
                workers: int | Backend = 1, overwrite: bool = False) -> StageSummary:
    """Run the stage from `clusters` (the cluster stage's shards) into `out`; returns its summary."""
    shards = input_shards(clusters)
    spec.check()
    claim_output(out, {"stage": "clip-filter", **asdict(settings), "model": [str(spec.path.resolve()),
                                                                              spec.fingerprint()],
                       "inputs": shard_fingerprint(shards)}, overwrite)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    if as_backend(workers).in_process:
        load_clip(spec)  # a bad checkpoint fails here, before the progress bar
    task = partial(filter_shard, out=out, spec=spec, settings=settings)
    gpus = GPUS_PER_TASK if spec.device.startswith("cuda") else 0
    rows = [row for shard_rows in run_tasks(task, shards, workers, "clip-filter", gpus) for row in shard_rows]
    return finish_stage(out, StageSummary("clip-filter", notes={"clusters": cluster_note(rows)}), rows)
