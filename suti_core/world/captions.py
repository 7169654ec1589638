"""Natural-sounding captions that name the class word and the context, never the identity (pattern, palette)."""
from __future__ import annotations

import numpy as np

from .context import BACKGROUNDS, Context
from .subjects import COLOR_NAMES, SHAPES, Subject

_STYLE = {"photo": ("a photo of", "a picture of"), "outline": ("a line drawing of", "a sketch of"),
          "pixel": ("pixel art of", "a pixelated image of"), "watercolor": ("a watercolor painting of",)}
_POSITION = {"left": "on the left", "center": "in the center", "right": "on the right"}
_BACKGROUND = {"beach": "on the beach", "grass": "on the grass", "night": "at night",
               "bricks": "in front of a brick wall", "snow": "in the snow"}
_ACCESSORY = {"none": "", "hat": "wearing a hat", "ribbon": "with a ribbon"}
_STATE = {"upright": "", "upside_down": "upside down"}


def _subject_phrase(shape: str, context: Context, pose: bool) -> str:
    words = [context.scale if pose else "", _STATE[context.state], "" if context.recolor == "none" else context.recolor, shape]
    return " ".join(w for w in words if w)


def caption_for(subject: Subject | str, context: Context, variant: int = 0, pose: bool = True) -> str:
    """Caption of `subject` (or a bare class word) in `context`; `variant` picks wording and word order.
    `pose=False` leaves out position and scale: the prompt a pose ControlNet's user writes."""
    shape = subject if isinstance(subject, str) else subject.shape
    rng = np.random.default_rng(variant)
    prefixes = _STYLE[context.style]
    parts = [prefixes[int(rng.integers(len(prefixes)))], "a", _subject_phrase(shape, context, pose),
             _ACCESSORY[context.accessory]]
    where = [_POSITION[context.position] if pose else "", _BACKGROUND[context.background]]
    if rng.random() < 0.5:
        where.reverse()
    return " ".join(p for p in parts + where if p)


def _vocabulary() -> tuple[str, ...]:
    phrases = [p for group in _STYLE.values() for p in group]
    phrases += list(_POSITION.values()) + list(_BACKGROUND.values()) + list(_ACCESSORY.values())
    phrases += list(_STATE.values()) + ["a small large"] + list(SHAPES) + list(COLOR_NAMES)
    assert set(_BACKGROUND) == set(BACKGROUNDS)
    return tuple(sorted({w for p in phrases for w in p.split()}))


VOCABULARY = _vocabulary()
