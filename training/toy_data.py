"""Random batches from the procedural world: images in [-1, 1], captions, and their ground truth."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from suti_core.eval.metrics import to_tensor
from suti_core.world import Context, Subject, caption_for, render, sample_context, subject_from_id, subject_ids


@dataclass
class WorldBatch:
    images: torch.Tensor           # (B, 3, S, S) in [-1, 1]
    captions: list[str]
    subjects: list[Subject]
    contexts: list[Context]
    seeds: list[int]               # render seeds: render_mask(subject, context, seed=...) gives the pose map


class WorldSampler:
    """Draws (subject, context) pairs of one split; deterministic from its seed."""

    def __init__(self, split: str = "train", size: int = 128, seed: int | list[int] = 0, p_edit: float = 0.15):
        self.ids = subject_ids(split)
        self.size = size
        self.p_edit = p_edit
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int) -> WorldBatch:
        subjects = [subject_from_id(int(i)) for i in self.rng.choice(self.ids, batch_size)]
        contexts = [sample_context(self.rng, self.p_edit) for _ in subjects]
        seeds = self.rng.integers(0, 2**31, batch_size)
        images = [render(s, c, self.size, int(seed)) for s, c, seed in zip(subjects, contexts, seeds)]
        captions = [caption_for(s, c, int(seed)) for s, c, seed in zip(subjects, contexts, seeds)]
        return WorldBatch(to_tensor(images), captions, subjects, contexts, [int(s) for s in seeds])


def world_batch(seed: int, stream: int, step: int, *, size: int, batch_size: int) -> WorldBatch:
    """Step `step`'s batch of one of a trainer's streams, drawn from (seed, stream, step) alone: the same batch
    whichever process renders it and whenever a run resumes (training.prefetch)."""
    return WorldSampler("train", size, [seed, stream, step]).batch(batch_size)
