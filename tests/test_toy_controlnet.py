"""The toy pose ControlNet: its training captions, the pose-map node, and the shipped weights in real ComfyUI
(listed by the stock ControlNetLoader, applied by ControlNetApplyAdvanced, and followed by the sampler)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from suti_core.eval.judge import HEADS
from suti_core.eval.metrics import judge_logits
from suti_core.world import NUM_SUBJECTS, Context, render_mask, subject_from_id
from suti_core.world.subjects import first_subject_of_shape
from training.toy_controlnet import hint_captions
from training.toy_data import WorldSampler

SHIPPED_CONTROLNET = Path(__file__).resolve().parents[1] / "models" / "controlnet" / "suti_toy_pose_controlnet.safetensors"
POSE_WORDS = {"left", "right", "center", "small", "large"}


def test_hint_captions_drop_pose_words_at_the_asked_rate():
    batch = WorldSampler("train", 64, seed=3).batch(200)
    assert hint_captions(batch, 0.0, np.random.default_rng(0)) == batch.captions
    assert not any(set(c.split()) & POSE_WORDS for c in hint_captions(batch, 1.0, np.random.default_rng(0)))
    half = hint_captions(batch, 0.5, np.random.default_rng(0))
    assert 70 <= sum(c != o for c, o in zip(half, batch.captions)) <= 130


def _pose_map(pack_nodes, **pose) -> torch.Tensor:
    return pack_nodes["SuTIToyPoseMap"].execute(**{"shape": "dog", "state": "upright", "seed": 0, **pose}).args[0]


def test_pose_map_node_draws_the_world_silhouette(pack_nodes):
    image = _pose_map(pack_nodes, position="left", scale="small", shape="cup", seed=5)
    assert image.shape == (1, 128, 128, 3) and image.dtype == torch.float32
    assert set(image.unique().tolist()) == {0.0, 1.0} and (image[..., 0] == image[..., 2]).all()
    cup = next(subject_from_id(i) for i in range(NUM_SUBJECTS) if subject_from_id(i).shape == "cup")
    assert first_subject_of_shape("cup") == cup
    expected = render_mask(cup, Context(position="left", scale="small"), 128, seed=5)
    assert torch.equal(image[0, ..., 0].bool(), torch.from_numpy(expected))

    def centroid_x_and_area(img: torch.Tensor) -> tuple[float, float]:
        cols = img[0, ..., 0].sum(0)
        return float((cols * torch.arange(128)).sum() / cols.sum()), float(cols.sum())

    (x_left, a_small), (x_right, a_large) = (centroid_x_and_area(image),
                                             centroid_x_and_area(_pose_map(pack_nodes, position="right", scale="large", shape="cup")))
    assert x_left < 55 < 73 < x_right and a_small < 0.6 * a_large


def test_stock_controlnet_loader_lists_the_shipped_pose_controlnet(pack_nodes):
    import folder_paths
    import nodes

    assert SHIPPED_CONTROLNET.is_file(), f"{SHIPPED_CONTROLNET} is missing: train it with `python -m training.toy_controlnet`"
    assert SHIPPED_CONTROLNET.name in folder_paths.get_filename_list("controlnet")
    (control_net,) = nodes.ControlNetLoader().load_controlnet(SHIPPED_CONTROLNET.name)
    assert control_net is not None


@pytest.mark.slow
def test_shipped_pose_controlnet_puts_the_subject_where_the_map_says(pack_nodes):
    """A prompt without position words, sampled with left/small and right/large maps: the judge must see the
    subject where each map put it in most images (the benchmark measures the rate: benchmarks/pose_control.py)."""
    import comfy.sample
    import nodes

    model, clip, vae = pack_nodes["SuTILoadToyBase"].execute("suti_toy_base.safetensors").args
    (control_net,) = nodes.ControlNetLoader().load_controlnet(SHIPPED_CONTROLNET.name)
    (positive,) = nodes.CLIPTextEncode().encode(clip, "a photo of a dog on the beach")
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    latent = torch.zeros(4, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 7)
    for position, scale in (("left", "small"), ("right", "large")):
        hint = _pose_map(pack_nodes, position=position, scale=scale)
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint, 1.0, 0.0, 1.0)
        out = comfy.sample.sample(model, noise, 12, 4.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=7)
        images = vae.decode(out).movedim(-1, 1) * 2 - 1
        logits = judge_logits(images)
        seen = [(HEADS["position"][p], HEADS["scale"][s]) for p, s in
                zip(logits["position"].argmax(1).tolist(), logits["scale"].argmax(1).tolist())]
        assert sum(s == (position, scale) for s in seen) >= 3, f"map said {(position, scale)}, the judge saw {seen}"
