"""The shipped judge and the metrics built on it, checked on renderer truth of held-out (test-split) subjects."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from suti_core.eval.judge import HEADS, IDENTITY_HEADS, IGNORE, labels_for, load_judge
from suti_core.eval.metrics import (TEXT_ATTRIBUTES, default_judge, head_accuracy, identity_embedding, image_quality,
                                    mean_stderr, render_truth, subject_fidelity, text_fidelity)
from suti_core.world import Context, subject_from_id
from training.toy_data import WorldSampler

torch.set_num_threads(1)
SHUFFLED_MAX = 0.6  # judge v1: shuffled pairs 0.29 ± 0.02, matched 0.96 ± 0.005 (60 test subjects)
TARGET_ACCURACY = 0.95  # the bar; the shipped judge (v3) is at detail 0.958, every other head >= 0.98


@pytest.fixture(scope="module")
def held_out_2k():
    """The 2,000 test-split renders training.train_judge reports its per-head table on."""
    return WorldSampler("test", 128, seed=12345, p_edit=0.5).batch(2000)


@pytest.fixture(scope="module")
def truth():
    """200 renders of test-split subjects, half of the contexts edited (as the judge was trained)."""
    return WorldSampler("test", 128, seed=2024, p_edit=0.5).batch(200)


@pytest.fixture(scope="module")
def photo_truth():
    """60 test-split subjects in unedited-colour photo contexts (accessory and state may change)."""
    batch = WorldSampler("test", 128, seed=7, p_edit=0.3).batch(60)
    contexts = [replace(c, style="photo", recolor="none") for c in batch.contexts]
    return batch.subjects, render_truth(batch.subjects, contexts, seeds=range(60))


@pytest.mark.slow
def test_judge_reaches_95_percent_per_head_on_held_out_truth(held_out_2k):
    accuracy = head_accuracy(held_out_2k.images, held_out_2k.subjects, held_out_2k.contexts)
    failing = {h: round(a, 4) for h, a in accuracy.items() if not a >= TARGET_ACCURACY}
    assert set(accuracy) == set(HEADS)
    assert not failing, f"judge heads below {TARGET_ACCURACY} on test-split renders: {failing}"


def test_text_fidelity_of_truth_is_near_perfect(truth):
    shapes = [s.shape for s in truth.subjects]
    scores = text_fidelity(truth.images, truth.contexts, shapes)
    assert set(scores) == set(TEXT_ATTRIBUTES)
    for attribute, values in scores.items():
        assert mean_stderr(values)[0] >= TARGET_ACCURACY, f"truth text fidelity for {attribute}: {mean_stderr(values)}"


def test_identity_embedding_is_unit_norm(truth):
    emb = identity_embedding(truth.images[:8])
    assert emb.shape == (8, sum(len(c) for c in IDENTITY_HEADS.values()))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(8))


def test_subject_fidelity_truth_high_shuffled_low(photo_truth):
    subjects, images = photo_truth
    matched = subject_fidelity(images, subjects).mean().item()
    shuffled = subject_fidelity(images, subjects[1:] + subjects[:1]).mean().item()
    assert matched >= 0.9, f"renders of a subject score only {matched:.3f} against its own references"
    assert shuffled <= SHUFFLED_MAX, f"renders score {shuffled:.3f} against OTHER subjects' references"


def test_subject_fidelity_accepts_reference_renders(photo_truth):
    subjects, images = photo_truth
    refs = [images[i: i + 1] for i in range(3)]
    by_tensor = subject_fidelity(images[:3], refs)
    torch.testing.assert_close(by_tensor, torch.ones(3), atol=1e-5, rtol=0)  # an image against itself


def test_image_quality_is_zero_on_the_target_and_positive_elsewhere():
    context = Context("beach", "left", "large")
    target = render_truth([subject_from_id(5)], [context], [3])
    other = render_truth([subject_from_id(2000)], [context], [3])
    assert image_quality(target, target).item() == 0.0
    assert image_quality(other, target).item() > 0.01


def test_labels_ignore_what_a_render_cannot_show():
    subject = subject_from_id(0)  # star, solid, red/orange, plain
    labels = labels_for(subject, Context(style="outline"))
    assert labels["shape"] != IGNORE and all(labels[h] == IGNORE for h in IDENTITY_HEADS if h != "shape")
    assert labels_for(subject, Context())["secondary"] == IGNORE, "solid+plain shows no secondary colour"
    recoloured = labels_for(subject, Context(recolor="blue"))
    assert recoloured["primary"] == HEADS["primary"].index("blue")


def test_mean_stderr_ignores_nan():
    mean, stderr = mean_stderr([1.0, 0.0, math.nan, 1.0, 0.0])
    assert mean == 0.5 and stderr == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    assert all(math.isnan(v) for v in mean_stderr([math.nan]))


def test_load_judge_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "not_a_judge.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a version"):
        load_judge(bad)
    with pytest.raises(FileNotFoundError, match="train_judge"):
        load_judge(tmp_path / "missing.safetensors")
    assert default_judge() is default_judge()


def test_judge_training_blur_is_a_normalised_gaussian_per_image():
    from training.train_judge import augment, blur

    images = torch.zeros(3, 3, 17, 17)
    images[:, :, 8, 8] = 1.0
    out = blur(images, torch.tensor([0.0, 1.0, 1.5]))
    assert torch.equal(out[0], images[0])                                   # sigma 0: untouched
    torch.testing.assert_close(out.sum(dim=(2, 3)), torch.ones(3, 3))       # no light lost or made
    assert float(out[1, 0, 8, 8]) == pytest.approx(1 / (2 * math.pi), rel=0.02)  # 2-D Gaussian peak at sigma 1
    assert float(out[2, 0, 8, 8]) < float(out[1, 0, 8, 8])
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment(images, 0.0, 1.5, generator), images)
