"""Contexts: the seed's skills (recontextualisation, view, stylisation, attribute, accessory, state)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .subjects import COLOR_NAMES

BACKGROUNDS = ("beach", "grass", "night", "bricks", "snow")
POSITIONS = ("left", "center", "right")
SCALES = ("small", "large")
STYLES = ("photo", "outline", "pixel", "watercolor")
ACCESSORIES = ("none", "hat", "ribbon")
STATES = ("upright", "upside_down")
RECOLORS = ("none",) + COLOR_NAMES


@dataclass(frozen=True)
class Context:
    """Where and how a subject appears; every field is named by the caption."""

    background: str = "grass"
    position: str = "center"
    scale: str = "large"
    style: str = "photo"
    recolor: str = "none"
    accessory: str = "none"
    state: str = "upright"


def sample_context(rng: np.random.Generator, p_edit: float = 0.15, p_recolor: float | None = None) -> Context:
    """A random context; each edit skill (style, recolor, accessory, state) is used with probability p_edit, the
    recolour with `p_recolor` where given (None: the benchmark's draw, unchanged)."""

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    def maybe(options: tuple[str, ...], p: float = p_edit) -> str:
        return pick(options[1:]) if rng.random() < p else options[0]

    recolor_share = p_edit if p_recolor is None else p_recolor
    return Context(pick(BACKGROUNDS), pick(POSITIONS), pick(SCALES),
                   maybe(STYLES), maybe(RECOLORS, recolor_share), maybe(ACCESSORIES), maybe(STATES))


def demo_contexts(count: int, seed: int = 0) -> list[Context]:
    """`count` plain photo contexts with varied background/position/scale: what a user's demo photos look like."""
    rng = np.random.default_rng(seed)
    backgrounds = rng.permutation(BACKGROUNDS)
    return [Context(str(backgrounds[i % len(BACKGROUNDS)]), POSITIONS[int(rng.integers(len(POSITIONS)))],
                    SCALES[int(rng.integers(len(SCALES)))]) for i in range(count)]
