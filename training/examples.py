"""Adapter-training examples: one subject's demos and a target of it in a new context, and their batches."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from suti_core.eval.metrics import to_tensor
from suti_core.world import Subject, subject_from_id


@dataclass
class SubjectBatch:
    """A step's examples as the trainer consumes them: tensors, captions, subjects."""

    demo_images: torch.Tensor   # (B * n_demos, 3, S, S) in [-1, 1], grouped by subject
    demo_captions: list[str]
    demo_masks: list[torch.Tensor | None]  # B * n_demos exact subject masks (S, S) bool; None where unknown
    target_images: torch.Tensor  # (B, 3, S, S)
    target_masks: torch.Tensor   # (B, S, S) bool: where the target shows the subject
    target_captions: list[str]
    subjects: list[Subject]


@dataclass(eq=False)
class SubjectExample:
    """One subject's demo photos and a target image of it in a new context: one shard sample."""

    subject: int
    demo_images: np.ndarray                # (n, S, S, 3) uint8
    demo_masks: list[np.ndarray | None]    # n masks (S, S) bool; None where the producer has none
    demo_captions: list[str]
    target_image: np.ndarray               # (S, S, 3) uint8
    target_mask: np.ndarray                # (S, S) bool
    target_caption: str


def collate(examples: Sequence[SubjectExample]) -> SubjectBatch:
    """The trainer's batch of `examples`, demos grouped by subject."""
    return SubjectBatch(to_tensor([image for e in examples for image in e.demo_images]),
                        [c for e in examples for c in e.demo_captions],
                        [None if m is None else torch.from_numpy(m) for e in examples for m in e.demo_masks],
                        to_tensor([e.target_image for e in examples]),
                        torch.from_numpy(np.stack([e.target_mask for e in examples])),
                        [e.target_caption for e in examples], [subject_from_id(e.subject) for e in examples])
