"""A subject's demonstration photos: the one seed rule the toy node, the trainer and the benchmark share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .captions import caption_for
from .context import demo_contexts
from .render import render, render_mask
from .subjects import Subject


@dataclass(frozen=True)
class DemoRenders:
    """`count` plain photos of one subject: images uint8 (n, S, S, 3), exact masks bool (n, S, S), captions."""

    images: np.ndarray
    masks: np.ndarray
    captions: list[str]


def render_demos(subject: Subject, count: int, seed: int, size: int = 128) -> DemoRenders:
    """Demo i is rendered in `demo_contexts(count, seed)[i]` with seed `seed + i`."""
    contexts = demo_contexts(count, seed)
    return DemoRenders(
        np.stack([render(subject, c, size, seed + i) for i, c in enumerate(contexts)]),
        np.stack([render_mask(subject, c, size, seed + i) for i, c in enumerate(contexts)]),
        [caption_for(subject, c, seed + i) for i, c in enumerate(contexts)],
    )
