"""Subject identities: shape × pattern × palette × detail, so the class word never pins the identity down."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

SHAPES = ("star", "heart", "cup", "bag", "dog", "house")
PATTERNS = ("solid", "stripes", "dots", "checks")
COLORS = {
    "red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (240, 210, 40), "green": (44, 160, 44),
    "blue": (31, 90, 220), "purple": (148, 70, 189), "pink": (240, 120, 190), "brown": (140, 86, 55),
    "black": (25, 25, 25), "white": (245, 245, 245),
}
COLOR_NAMES = tuple(COLORS)
DETAILS = ("plain", "border", "spot")
PALETTES = tuple((a, b) for a in COLOR_NAMES for b in COLOR_NAMES if a != b)
NUM_SUBJECTS = len(SHAPES) * len(PATTERNS) * len(PALETTES) * len(DETAILS)

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class Subject:
    """One identity; `shape` is the only part a caption names."""

    id: int
    shape: str
    pattern: str
    primary: str
    secondary: str
    detail: str


def subject_from_id(subject_id: int) -> Subject:
    """Decode a subject id in [0, NUM_SUBJECTS) into its attributes (mixed radix)."""
    if not 0 <= subject_id < NUM_SUBJECTS:
        raise ValueError(f"subject id {subject_id} outside [0, {NUM_SUBJECTS})")
    rest, detail = divmod(subject_id, len(DETAILS))
    rest, palette = divmod(rest, len(PALETTES))
    shape, pattern = divmod(rest, len(PATTERNS))
    primary, secondary = PALETTES[palette]
    return Subject(subject_id, SHAPES[shape], PATTERNS[pattern], primary, secondary, DETAILS[detail])


def first_subject_of_shape(shape: str) -> Subject:
    """The lowest-id subject of a shape (the mixed radix puts shape first): a stand-in wherever only the
    silhouette matters, e.g. a pose map."""
    return subject_from_id(SHAPES.index(shape) * len(PATTERNS) * len(PALETTES) * len(DETAILS))


def subject_split(subject_id: int) -> Split:
    """Stable train/val/test split by subject (80/10/10), independent of Python's hash seed."""
    bucket = hashlib.sha256(f"suti-subject-{subject_id}".encode()).digest()[0] % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def subject_ids(split: Split) -> list[int]:
    """All subject ids of one split, ascending."""
    return [i for i in range(NUM_SUBJECTS) if subject_split(i) == split]
