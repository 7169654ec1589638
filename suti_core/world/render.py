"""Deterministic renderer: (subject, context, seed) -> RGB uint8 image, plus the silhouette map."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .context import Context
from .subjects import COLORS, Subject

_X_CENTER = {"small": {"left": 0.27, "center": 0.5, "right": 0.73},
             "large": {"left": 0.35, "center": 0.5, "right": 0.65}}
_BOX = {"small": 0.40, "large": 0.62}
_ACCESSORY_COLORS = {"hat": ((40, 40, 160), (250, 250, 250)), "ribbon": ((230, 20, 60), (120, 0, 30))}


def _star(d: ImageDraw.ImageDraw, b: int) -> None:
    ang = np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, 0.5, 0.21) * b
    d.polygon([(b / 2 + r * np.cos(a), b * 0.53 - r * np.sin(a)) for a, r in zip(ang, rad)], fill=255)


def _heart(d: ImageDraw.ImageDraw, b: int) -> None:
    t = np.linspace(0, 2 * np.pi, 60)
    x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    d.polygon([(b / 2 + xi * b / 34, b * 0.45 - yi * b / 34) for xi, yi in zip(x, y)], fill=255)


def _cup(d: ImageDraw.ImageDraw, b: int) -> None:
    d.polygon([(0.12 * b, 0.18 * b), (0.72 * b, 0.18 * b), (0.64 * b, 0.92 * b), (0.2 * b, 0.92 * b)], fill=255)
    d.ellipse([0.55 * b, 0.3 * b, 0.95 * b, 0.7 * b], outline=255, width=max(2, b // 12))


def _bag(d: ImageDraw.ImageDraw, b: int) -> None:
    d.rounded_rectangle([0.08 * b, 0.35 * b, 0.92 * b, 0.95 * b], radius=b // 10, fill=255)
    d.arc([0.28 * b, 0.08 * b, 0.72 * b, 0.6 * b], 180, 360, fill=255, width=max(2, b // 12))


def _dog(d: ImageDraw.ImageDraw, b: int) -> None:
    d.ellipse([0.12 * b, 0.35 * b, 0.78 * b, 0.72 * b], fill=255)            # body
    d.ellipse([0.6 * b, 0.12 * b, 0.95 * b, 0.45 * b], fill=255)             # head
    d.polygon([(0.62 * b, 0.2 * b), (0.68 * b, 0.02 * b), (0.76 * b, 0.18 * b)], fill=255)  # ear
    for x in (0.18, 0.32, 0.55, 0.67):                                       # legs
        d.rectangle([x * b, 0.6 * b, (x + 0.09) * b, 0.95 * b], fill=255)
    d.line([(0.15 * b, 0.45 * b), (0.02 * b, 0.22 * b)], fill=255, width=max(2, b // 14))  # tail


def _house(d: ImageDraw.ImageDraw, b: int) -> None:
    d.rectangle([0.15 * b, 0.45 * b, 0.85 * b, 0.95 * b], fill=255)
    d.polygon([(0.05 * b, 0.48 * b), (0.5 * b, 0.08 * b), (0.95 * b, 0.48 * b)], fill=255)


_SHAPE_DRAWERS = {"star": _star, "heart": _heart, "cup": _cup, "bag": _bag, "dog": _dog, "house": _house}


@lru_cache(maxsize=64)
def _shape_mask(shape: str, b: int) -> np.ndarray:
    img = Image.new("L", (b, b), 0)
    _SHAPE_DRAWERS[shape](ImageDraw.Draw(img), b)
    return np.asarray(img) > 127


@lru_cache(maxsize=64)
def _pattern_index(pattern: str, b: int) -> np.ndarray:
    """Boolean map: True where the secondary colour shows. Period scales with the subject box."""
    yy, xx = np.mgrid[0:b, 0:b]
    half = max(5, b // 7)
    if pattern == "solid":
        return np.zeros((b, b), bool)
    if pattern == "stripes":
        return ((xx + yy) // half) % 2 == 1
    if pattern == "checks":
        return ((xx // half) + (yy // half)) % 2 == 1
    cell = 2 * half  # dots
    cy, cx = (yy % cell) - cell / 2, (xx % cell) - cell / 2
    return cy**2 + cx**2 <= (cell * 0.28) ** 2


def _detail_map(detail: str, mask: np.ndarray) -> np.ndarray:
    b = mask.shape[0]
    if detail == "border":
        w = max(2, b // 16)
        inner = mask.copy()
        for dy, dx in ((w, 0), (-w, 0), (0, w), (0, -w)):
            inner &= np.roll(mask, (dy, dx), axis=(0, 1))
        return mask & ~inner
    if detail == "spot":
        yy, xx = np.mgrid[0:b, 0:b]
        return mask & ((yy - 0.6 * b) ** 2 + (xx - 0.45 * b) ** 2 <= (0.13 * b) ** 2)
    return np.zeros_like(mask)


@lru_cache(maxsize=16)
def _background(name: str, size: int) -> np.ndarray:
    s = size
    img = np.zeros((s, s, 3), np.uint8)
    yy, xx = np.mgrid[0:s, 0:s]
    if name == "beach":
        img[:] = (238, 214, 160)
        img[: int(0.45 * s)] = (135, 200, 235)
        img[int(0.45 * s): int(0.55 * s)] = (40, 120, 190)
    elif name == "grass":
        img[:] = (70, 150, 60)
        img[((yy // max(2, s // 16)) % 2 == 0) & (yy > 0.35 * s)] = (60, 130, 50)
        img[: int(0.35 * s)] = (170, 210, 240)
    elif name == "night":
        img[:] = (15, 20, 50)
        stars = np.random.default_rng(7).integers(0, s, size=(max(8, s // 4), 2))
        img[stars[:, 0], stars[:, 1]] = (255, 255, 220)
        img[(yy - 0.15 * s) ** 2 + (xx - 0.85 * s) ** 2 <= (0.07 * s) ** 2] = (240, 240, 200)
    elif name == "bricks":
        img[:] = (160, 70, 50)
        row_h, brick_w = max(4, s // 12), max(8, s // 6)
        offset = ((yy // row_h) % 2) * (brick_w // 2)
        img[(yy % row_h == 0) | ((xx + offset) % brick_w == 0)] = (205, 195, 185)
    elif name == "snow":
        img[:] = (240, 244, 250)
        img[: int(0.4 * s)] = (190, 198, 212)
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


def _posed(box: np.ndarray, context: Context) -> np.ndarray:
    """A subject-box array in the context's state (upside down flips it)."""
    return box[::-1] if context.state == "upside_down" else box


def _subject_layer(subject: Subject, context: Context, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour (b, b, 3) and mask (b, b) of the subject, with its detail, recolour and state."""
    mask = _shape_mask(subject.shape, b)
    primary = COLORS[context.recolor if context.recolor != "none" else subject.primary]
    secondary_at = _pattern_index(subject.pattern, b) | _detail_map(subject.detail, mask)
    rgb = np.where(secondary_at[..., None], np.array(COLORS[subject.secondary], np.uint8),
                   np.array(primary, np.uint8))
    return _posed(rgb, context), _posed(mask, context)


def _accessory_layer(accessory: str, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An accessory drawn relative to the subject's silhouette, in the box's coordinates."""
    b = mask.shape[0]
    img = Image.new("RGB", (b, b))
    alpha = Image.new("L", (b, b), 0)
    main, extra = _ACCESSORY_COLORS[accessory]
    rows = np.flatnonzero(mask.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1])
    cols = np.flatnonzero(mask[top])
    cx = float(cols.mean())
    for canvas, fill_main, fill_extra in ((ImageDraw.Draw(img), main, extra), (ImageDraw.Draw(alpha), 255, 255)):
        if accessory == "hat":
            h = 0.3 * b
            canvas.polygon([(cx - 0.16 * b, top + 2), (cx + 0.16 * b, top + 2), (cx, top - h)], fill=fill_main)
            canvas.rectangle([cx - 0.17 * b, top - 0.05 * b, cx + 0.17 * b, top + 2], fill=fill_extra)
        else:
            y = top + 0.55 * (bottom - top)
            w = 0.14 * b
            canvas.polygon([(cx, y), (cx - w, y - w * 0.7), (cx - w, y + w * 0.7)], fill=fill_main)
            canvas.polygon([(cx, y), (cx + w, y - w * 0.7), (cx + w, y + w * 0.7)], fill=fill_main)
            canvas.ellipse([cx - w * 0.3, y - w * 0.3, cx + w * 0.3, y + w * 0.3], fill=fill_extra)
    return np.asarray(img), np.asarray(alpha) > 127


def _placement(context: Context, size: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Top-left corner and side of the subject box, with a little seeded jitter."""
    b = int(round(_BOX[context.scale] * size * rng.uniform(0.95, 1.05)))
    cx = (_X_CENTER[context.scale][context.position] + rng.uniform(-0.03, 0.03)) * size
    cy = (0.58 if context.scale == "small" else 0.55) * size + rng.uniform(-0.02, 0.02) * size
    return int(round(cy - b / 2)), int(round(cx - b / 2)), b


def _paste(canvas: np.ndarray, layer: np.ndarray, where: np.ndarray, top: int, left: int) -> None:
    """Copy layer[where] onto canvas at (top, left), clipping at the borders (in place)."""
    b = where.shape[0]
    s = canvas.shape[0]
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(s, top + b), min(s, left + b)
    sub_where = where[y0 - top: y1 - top, x0 - left: x1 - left]
    canvas[y0:y1, x0:x1][sub_where] = layer[y0 - top: y1 - top, x0 - left: x1 - left][sub_where]


def _scene(subject: Subject, context: Context, size: int, seed: int) -> np.ndarray:
    top, left, b = _placement(context, size, np.random.default_rng(seed))
    rgb, mask = _subject_layer(subject, context, b)
    image = _background(context.background, size).copy()
    _paste(image, rgb, mask, top, left)
    if context.accessory != "none":
        acc_rgb, acc_mask = _accessory_layer(context.accessory, mask)
        _paste(image, acc_rgb, acc_mask, top, left)
    return image


def _stylise(image: np.ndarray, style: str) -> np.ndarray:
    if style == "photo":
        return image
    s = image.shape[0]
    if style == "pixel":
        k = max(2, s // 16)
        small = image.reshape(s // k, k, s // k, k, 3).mean(axis=(1, 3))
        return np.repeat(np.repeat(small, k, 0), k, 1).astype(np.uint8)
    if style == "watercolor":
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(max(1.0, s / 64))), np.float32)
        paper = np.array((250, 244, 228), np.float32)
        return (0.7 * (np.round(blurred / 48) * 48) + 0.3 * paper).clip(0, 255).astype(np.uint8)
    if style == "outline":
        grey = image.astype(np.float32).mean(axis=2)
        edge = (np.abs(np.diff(grey, axis=0, prepend=grey[:1])) + np.abs(np.diff(grey, axis=1, prepend=grey[:, :1]))) > 40
        out = np.full_like(image, 250)
        out[edge] = (30, 30, 30)
        return out
    raise ValueError(f"unknown style {style!r}")


def render(subject: Subject, context: Context, size: int = 128, seed: int = 0) -> np.ndarray:
    """RGB uint8 (size, size, 3) render of `subject` in `context`; identical for identical arguments."""
    _check_size(size)
    return _stylise(_scene(subject, context, size, seed), context.style)


def render_mask(subject: Subject, context: Context, size: int = 128, seed: int = 0) -> np.ndarray:
    """Silhouette map (size, size) bool — the pose condition for the ControlNet; same placement as `render`
    (the same seed draws the same jitter), without drawing the scene."""
    _check_size(size)
    top, left, b = _placement(context, size, np.random.default_rng(seed))
    mask = _posed(_shape_mask(subject.shape, b), context)
    silhouette = np.zeros((size, size), bool)
    _paste(silhouette, mask, mask, top, left)
    return silhouette


def pose_map(subject: Subject, context: Context, size: int = 128, seed: int = 0) -> np.ndarray:
    """The ControlNet hint as an image: float32 (size, size, 3) in [0, 1], white silhouette on black."""
    return np.repeat(render_mask(subject, context, size, seed)[..., None], 3, axis=2).astype(np.float32)


def _check_size(size: int) -> None:
    if size % 16:
        raise ValueError(f"render size must be a multiple of 16, got {size}")
