"""Natural-sounding captions that name the class word and the context, never the identity (pattern, palette)."""
from __future__ import annotations

import numpy as np

from .context import BACKGROUNDS, SCALES, Context
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


def parse_caption(caption: str) -> tuple[Context, frozenset[str]]:
    """The context a `caption_for` caption names (its inverse, read from the same phrase tables) and which Context
    fields it states: a pose-free caption states neither position nor scale, which then keep Context's defaults.
    Words outside the tables (a subject identifier such as "sks") are ignored."""
    text = " ".join(caption.lower().split())
    words = set(text.split())
    style = [s for s, prefixes in _STYLE.items() if any(text.startswith(p) for p in prefixes)]
    background = [b for b, phrase in _BACKGROUND.items() if phrase in text]
    if len(style) != 1 or len(background) != 1:
        raise ValueError(f"cannot read style and background from the caption {caption!r}; only captions written by "
                         "suti_core.world.caption_for can be read back")
    stated = {"style": style[0], "background": background[0],
              "accessory": next((a for a, p in _ACCESSORY.items() if p and p in text), "none"),
              "state": next((s for s, p in _STATE.items() if p and p in text), "upright"),
              "recolor": next((c for c in COLOR_NAMES if c in words), "none")}
    position = [p for p, phrase in _POSITION.items() if phrase in text]
    scale = [s for s in SCALES if s in words]
    stated |= {"position": position[0]} if position else {}
    stated |= {"scale": scale[0]} if scale else {}
    return Context(**stated), frozenset(stated)


def _vocabulary() -> tuple[str, ...]:
    phrases = [p for group in _STYLE.values() for p in group]
    phrases += list(_POSITION.values()) + list(_BACKGROUND.values()) + list(_ACCESSORY.values())
    phrases += list(_STATE.values()) + ["a small large"] + list(SHAPES) + list(COLOR_NAMES)
    assert set(_BACKGROUND) == set(BACKGROUNDS)
    return tuple(sorted({w for p in phrases for w in p.split()}))


VOCABULARY = _vocabulary()
