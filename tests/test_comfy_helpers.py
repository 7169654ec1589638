"""The shared test fixtures are what they claim: ComfyUI's own SD1.5/SD2.x/SDXL layouts, runnable on CPU."""

from __future__ import annotations

import comfy_helpers as ch
import pytest
import torch

HEAD_KEYS = ("num_heads", "num_head_channels")  # set by the supported_models class, not by detection
WIDTH_KEYS = ("model_channels", "context_dim")  # the only thing the tiny models shrink


def _detect(state_dict: dict) -> dict:
    import comfy.model_detection

    return comfy.model_detection.detect_unet_config(state_dict, "")


@pytest.mark.parametrize("arch", ch.ARCHS)
def test_full_layout_is_what_comfyui_detects_from_a_real_size_unet(comfyui, arch):
    """A full-size UNet built from FULL_LAYOUTS (on the meta device: no memory) is detected by ComfyUI
    as exactly that layout and mapped to its own SD15/SD20/SDXL config class."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    layout = ch.FULL_LAYOUTS[arch]
    unet = UNetModel(**layout, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    detected = _detect(unet.state_dict())
    expected = {k: v for k, v in layout.items() if k not in HEAD_KEYS}
    assert {k: detected.get(k) for k in expected} == expected
    config = comfy.model_detection.model_config_from_unet_config(detected, unet.state_dict())
    assert type(config) is ch.supported_model_class(arch)


def test_tiny_unet_keeps_comfyui_block_layout(tiny_unet):
    """Detection on the tiny model's weights gives the full layout with only the widths changed."""
    detected = _detect(tiny_unet.model.model.diffusion_model.state_dict())
    layout = ch.FULL_LAYOUTS[tiny_unet.arch]
    for key, value in layout.items():
        if key in HEAD_KEYS:
            continue
        expected = ch.TINY_DIMS[tiny_unet.arch][key] if key in WIDTH_KEYS else value
        assert detected.get(key) == expected, f"{tiny_unet.arch}: {key} is {detected.get(key)}, want {expected}"
    assert type(tiny_unet.model.model.model_config) is ch.supported_model_class(tiny_unet.arch)


def test_tiny_unet_is_seeded(comfyui):
    a, b, c = (ch.make_tiny_unet("sd20", seed=s).model.diffusion_model.state_dict() for s in (0, 0, 1))
    key = "input_blocks.1.1.proj_in.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_ksampler_runs_tiny_unet_batch2_cond_uncond(tiny_unet):
    """run_ksampler (stock KSampler path) works at batch 2 with cfg (cond + uncond); the prompt matters."""
    first = tiny_unet.sample(batch=2, steps=1, seed=3)
    other = tiny_unet.sample(positive="a red star", batch=2, steps=1, seed=3)
    assert first.shape == (2, 4, ch.LATENT_SIZE, ch.LATENT_SIZE) and torch.isfinite(first).all()
    assert not torch.allclose(first, other), "the prompt had no effect on the sample"


def test_tiny_clip_conditioning_shapes(comfyui):
    for arch in ch.ARCHS:
        clip = ch.TinyCLIP(arch)
        ((cond, extra),) = ch.tiny_cond(arch, "a photo of a cup")
        assert cond.shape == (1, 77, ch.TINY_DIMS[arch]["context_dim"])
        assert extra["pooled_output"].shape == (1, ch.POOLED_DIM.get(arch, ch.TINY_DIMS[arch]["context_dim"]))
        assert torch.equal(clip.encode("a cup"), clip.encode("a cup"))
        assert not torch.equal(clip.encode("a cup"), clip.encode("a star"))


def test_tiny_vae_round_trip_shapes(tiny_vae):
    image = torch.rand(2, 64, 48, 3)  # (B, H, W, C) in [0, 1], as ComfyUI IMAGE
    latent = tiny_vae.encode(image)
    assert latent.shape == (2, 4, 8, 6)
    decoded = tiny_vae.decode(latent)
    assert decoded.shape == (2, 64, 48, 3) and decoded.min() >= 0.0 and decoded.max() <= 1.0
