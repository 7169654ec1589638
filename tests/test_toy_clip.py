"""The toy CLIP trainer: what it writes loads through clip-filter's own path, and a resumed run continues exactly."""
from __future__ import annotations

from pathlib import Path

import pytest

open_clip = pytest.importorskip("open_clip")
import torch
from data_stage_helpers import TINY_CLIP
from PIL import Image

from suti_core.world import Context, caption_for, render, subject_from_id
from training.data.clip_filter import ClipModel, score_images
from training.toy_clip import ToyClipTrainer, train

BATCH = 4


def trained(out: Path, steps: int) -> ToyClipTrainer:
    trainer = ToyClipTrainer(out, TINY_CLIP, BATCH, seed=3)
    train(trainer, steps, minutes=5)
    return trainer


def test_trained_folder_scores_through_clip_filter(tmp_path: Path) -> None:
    trained(tmp_path / "clip", 2)
    subject, contexts = subject_from_id(7), [Context(), Context(background="snow"), Context(background="night")]
    images = [Image.fromarray(render(subject, c, 128, seed=i)) for i, c in enumerate(contexts)]
    scores = score_images(ClipModel(tmp_path / "clip"), images,
                          [caption_for(subject, c) for c in contexts])
    assert len(scores) == 3, scores
    for image_image, image_text in scores:
        assert -1 <= image_image <= 1 and -1 <= image_text <= 1, f"scores are not cosines: {scores}"


def test_resume_is_exact(tmp_path: Path) -> None:
    straight = trained(tmp_path / "straight", 2).model.state_dict()
    trained(tmp_path / "resumed", 1)
    trainer = ToyClipTrainer.resumed(tmp_path / "resumed", lr=1e-3)
    assert trainer.step == 1, f"resumed at step {trainer.step}, not 1"
    train(trainer, 2, minutes=5)
    resumed = trainer.model.state_dict()
    differing = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differing, f"1+1 resumed steps differ from 2 straight steps in {differing}"
