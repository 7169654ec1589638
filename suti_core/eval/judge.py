"""The judge: a small CNN with one classification head per world attribute (identity and context).

Its identity heads give the subject-identity embedding (the DINO analogue of DreamBench), its context
heads judge whether an image shows what a prompt asked (the CLIP-T analogue). Images are float
(B, 3, H, W) in [-1, 1] (the world sampler's and the autoencoder's range); any H = W that is a
multiple of the judge's input size (128 by default: a small subject's 3 px border needs full resolution) is
area-downsampled to it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..world.context import ACCESSORIES, BACKGROUNDS, POSITIONS, SCALES, STATES, STYLES, Context
from ..world.subjects import COLOR_NAMES, DETAILS, PATTERNS, SHAPES, Subject

JUDGE_FORMAT = "suti-judge"
JUDGE_VERSION = 1
INPUT_SIZE = 128
STEM_SIZE = 32  # side of the feature map after the lossless pixel-unshuffle stem
IGNORE = -100  # label of an attribute the image does not show (cross_entropy's ignore_index)

IDENTITY_HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "pattern": PATTERNS, "primary": COLOR_NAMES, "secondary": COLOR_NAMES, "detail": DETAILS,
}
# No recolour head: "a red star" recoloured and a star born red render identically, so a recolour prompt is
# judged by the primary head, whose label is the colour the body shows (see docs/EVAL.md).
CONTEXT_HEADS: dict[str, tuple[str, ...]] = {
    "background": BACKGROUNDS, "position": POSITIONS, "scale": SCALES, "style": STYLES,
    "accessory": ACCESSORIES, "state": STATES,
}
HEADS: dict[str, tuple[str, ...]] = {**IDENTITY_HEADS, **CONTEXT_HEADS}
_COLOUR_STYLES = ("photo", "watercolor")  # styles that keep a subject's colours and texture
EQUAL_AREA_PATTERNS = ("stripes", "checks")


def identity_labels_visible(subject: Subject, context: Context) -> dict[str, bool]:
    """Which identity attributes the render of (subject, context) shows at all."""
    shown = context.style in _COLOUR_STYLES
    primary = context.recolor if context.recolor != "none" else subject.primary
    two_tone = shown and primary != subject.secondary  # a recolour to the secondary hides the pattern
    return {"shape": True, "pattern": two_tone, "primary": shown,
            "secondary": two_tone and not (subject.pattern == "solid" and subject.detail == "plain"),
            "detail": two_tone}


def shown_palette(subject: Subject, context: Context) -> tuple[str, str]:
    """(primary, secondary) as the judge labels them: the primary is the colour the body shows (the recolour if
    any); for stripes and checks, whose two colours cover equal areas and differ only by the stripes' phase, the
    pair is unordered and labelled in COLOR_NAMES order."""
    primary = context.recolor if context.recolor != "none" else subject.primary
    if subject.pattern in EQUAL_AREA_PATTERNS:
        primary, secondary = sorted((primary, subject.secondary), key=COLOR_NAMES.index)
        return primary, secondary
    return primary, subject.secondary


def labels_for(subject: Subject, context: Context) -> dict[str, int]:
    """Class index per head for a render of (subject, context); IGNORE where the image cannot show it."""
    primary, secondary = shown_palette(subject, context)
    values = {"shape": subject.shape, "pattern": subject.pattern, "primary": primary,
              "secondary": secondary, "detail": subject.detail, "background": context.background,
              "position": context.position, "scale": context.scale, "style": context.style,
              "accessory": context.accessory, "state": context.state}
    visible = identity_labels_visible(subject, context) | {h: True for h in CONTEXT_HEADS}
    return {h: HEADS[h].index(values[h]) if visible[h] else IGNORE for h in HEADS}


def to_judge_input(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, 3, size, size), area-downsampled."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"judge wants square (B, 3, S, S) images in [-1, 1], got {tuple(images.shape)}")
    if images.shape[-1] % size:
        raise ValueError(f"image side {images.shape[-1]} is not a multiple of the judge's input size {size}")
    return F.adaptive_avg_pool2d(images.float(), size)


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def _stage(c_in: int, c_out: int, double: bool) -> nn.Sequential:
    """A stride-2 conv, then (if `double`) a same-size conv."""
    return nn.Sequential(*_conv(c_in, c_out, 2), *(_conv(c_out, c_out, 1) if double else []))


class Judge(nn.Module):
    """A lossless pixel-unshuffle stem (input -> 32 px, keeps fine texture), 3 stride-2 conv stages (-> 4 px), then
    the flattened 4×4 map (keeps position) with its global mean and max (position-free identity cues), a shared
    FC, one linear head per attribute."""

    def __init__(self, widths: tuple[int, ...] = (48, 64, 96, 128), hidden: int = 256, input_size: int = INPUT_SIZE):
        super().__init__()
        if input_size % STEM_SIZE:
            raise ValueError(f"judge input size {input_size} is not a multiple of {STEM_SIZE}")
        self.widths, self.hidden, self.input_size = tuple(widths), hidden, input_size
        factor = input_size // STEM_SIZE
        stem = nn.Sequential(nn.PixelUnshuffle(factor), *_conv(3 * factor**2, self.widths[0], 1))
        self.features = nn.Sequential(stem, *[_stage(a, b, True) for a, b in zip(self.widths, self.widths[1:])])
        side = STEM_SIZE // 2 ** (len(self.widths) - 1)
        self.trunk = nn.Sequential(nn.Linear(self.widths[-1] * (side * side + 2), hidden), nn.ReLU())
        self.heads = nn.ModuleDict({h: nn.Linear(hidden, len(c)) for h, c in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> logits per head, {name: (B, n_classes)}."""
        x = to_judge_input(images, self.input_size).contiguous(memory_format=torch.channels_last)  # faster convs on CPU
        f = self.features(x)  # (B, C, 4, 4)
        z = self.trunk(torch.cat([f.flatten(1), f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))  # (B, hidden)
        return {h: head(z) for h, head in self.heads.items()}


def judge_metadata(judge: Judge, **extra: str) -> dict[str, str]:
    return {"format": JUDGE_FORMAT, "version": str(JUDGE_VERSION), "input_size": str(judge.input_size),
            "input_range": "[-1, 1]", "heads": json.dumps(HEADS), "widths": json.dumps(judge.widths),
            "hidden": str(judge.hidden), **extra}


def save_judge(judge: Judge, path: str | Path, **extra: str) -> None:
    """fp16 safetensors with the head layout in the metadata."""
    tensors = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in judge.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=judge_metadata(judge, **extra))


def load_judge(path: str | Path) -> Judge:
    """Judge in eval mode (fp32) from a file written by `save_judge`; checks format, version and heads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge weights {path} do not exist; train them with `python -m training.train_judge`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != JUDGE_FORMAT or int(meta.get("version", -1)) != JUDGE_VERSION:
        raise ValueError(f"{path} is not a version-{JUDGE_VERSION} SuTI judge (metadata {meta.get('format')!r} "
                         f"v{meta.get('version')}); retrain with `python -m training.train_judge`")
    if json.loads(meta["heads"]) != {h: list(c) for h, c in HEADS.items()}:
        raise ValueError(f"{path} was trained for other heads than this pack's world; retrain it")
    judge = Judge(tuple(json.loads(meta["widths"])), int(meta["hidden"]), int(meta["input_size"]))
    judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return judge.eval().requires_grad_(False)
