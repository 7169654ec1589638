"""The diffusers training host of the SuTI adapter computes what ComfyUI's SuTI Apply computes."""
from __future__ import annotations

import importlib
import math
from dataclasses import astuple
from pathlib import Path

import pytest
import torch

from suti_core.adapter import load_adapter, save_adapter
from suti_core.toy.checkpoint import read_toy_base
from training.adapter_host import DiffusersSuTIHost
from training.toy_base import ddpm_alphas_cumprod
from training.toy_controlnet import load_base_unet

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "models/toy/suti_toy_base.safetensors"


@pytest.fixture(scope="module")
def host() -> DiffusersSuTIHost:
    return DiffusersSuTIHost(load_base_unet(read_toy_base(SHIPPED_BASE)), ddpm_alphas_cumprod())


def random_adapter(host: DiffusersSuTIHost, seed: int = 0):
    """An adapter whose every weight (the zero-initialised output included) is random: every block matters."""
    adapter = host.new_adapter()
    generator = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        p.data = torch.randn(p.shape, generator=generator) * 0.1
    return adapter


def demo_inputs(n_samples: int, n_demos: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples * n_demos, 4, 16, 16, generator=generator), torch.randn(n_samples * n_demos, 24, 128, generator=generator)


def eps(host: DiffusersSuTIHost, x: torch.Tensor, context: torch.Tensor, t: float = 500.0) -> torch.Tensor:
    with torch.no_grad():
        return host.unet(x, torch.full((x.shape[0],), t), context).sample


def test_zero_initialised_adapter_changes_nothing_and_hooks_go_away(host):
    latents, context = demo_inputs(2, 3)
    neighbors = host.encode_demos(latents, context, demos_per_sample=3)
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 24, 128)
    plain = eps(host, x, text)
    with host.neighbor_attention(host.new_adapter(), neighbors):
        assert torch.equal(eps(host, x, text), plain)
    with host.neighbor_attention(random_adapter(host), neighbors):
        assert (eps(host, x, text) - plain).abs().max() > 1e-3
    assert torch.equal(eps(host, x, text), plain), "hooks must be removed when the block ends"


def test_demo_features_are_grouped_per_sample_in_demo_order(host):
    latents, context = demo_inputs(2, 3)
    both = host.encode_demos(latents, context, demos_per_sample=3)
    second = host.encode_demos(latents[3:], context[3:], demos_per_sample=3)
    assert set(both) == host.source_keys
    for key, features in both.items():
        tokens = second[key].shape[1] // 3
        assert features.shape == (2, 3 * tokens, second[key].shape[2])
        torch.testing.assert_close(features[1:], second[key], rtol=1e-4, atol=1e-5)
        one_demo = host.encode_demos(latents[4:5], context[4:5], demos_per_sample=1)[key]
        torch.testing.assert_close(features[1:, tokens: 2 * tokens], one_demo, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- against ComfyUI

@pytest.fixture(scope="module")
def comfy_toy(suti_pack):
    """(model, clip, vae) of the shipped toy base loaded by the pack's loader, and the pack's patching module."""
    toy_base = importlib.import_module(f"{suti_pack.__name__}.nodes.toy_base")
    return toy_base.load_toy_base(SHIPPED_BASE), importlib.import_module(f"{suti_pack.__name__}.nodes.patching")


def test_block_layout_is_what_comfyui_reports(host, comfy_toy):
    (model, _, _), patching = comfy_toy
    layout = patching.describe_model(model)
    assert [astuple(b) for b in layout.blocks] == [astuple(b) for b in host.block_specs]  # the pack has its own copy of suti_core
    assert (layout.architecture, layout.context_dim) == (host.architecture, host.context_dim)
    assert host.new_adapter().metadata.block_map == layout.block_map


def test_host_prediction_equals_comfyui_suti_apply_with_the_saved_adapter(host, comfy_toy, tmp_path):
    """Same demos, adapter file, noisy latent, sigma and caption: the diffusers host's denoised latent equals the
    one ComfyUI computes with the pack's own demo encoding and middle_patch."""
    (model, clip, vae), patching = comfy_toy
    save_adapter(tmp_path / "adapter.safetensors", random_adapter(host, seed=3))
    adapter = load_adapter(tmp_path / "adapter.safetensors")
    base = model.model
    pixels = torch.rand(3, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    demos_module = importlib.import_module(patching.__name__.rsplit(".", 1)[0] + ".demos")
    demos = demos_module.make_demonstrations(pixels, "a photo of a dog\na dog in the snow\na small dog", vae, clip, 128)
    layout = patching.describe_model(model)
    settings = patching.SuTISettings("suti_test", tuple(demos), layout.source_keys, layout.block_map, 1.0, math.inf,
                                     0.0, {"input": 1.0, "middle": 1.0, "output": 1.0}, False)
    sigma_min = base.model_sampling.sigma_min.reshape(1)
    features = patching.encode_demo_features(base, demos, layout.source_keys, sigma_min, torch.device("cpu"))
    patch = patching.NeighborResidualPatch(patching.adapter_model_patcher(adapter), settings)
    sigma = torch.tensor([3.0])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * (sigma**2 + 1).sqrt()
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a dog on the beach"))[0][0]
    options = {"patches": {"middle_patch": [patch]}, "suti_test": features, "sigmas": sigma, "cond_or_uncond": [0]}
    with torch.no_grad():
        comfy_denoised = base.apply_model(x, sigma, c_crossattn=cond, transformer_options=options)
        comfy_plain = base.apply_model(x, sigma, c_crossattn=cond)

    demo_latents = torch.cat([base.process_latent_in(d.latent) for d in demos])
    torch.testing.assert_close(demo_latents, torch.cat([d.latent for d in demos]) * read_toy_base(SHIPPED_BASE).latent_scale)
    neighbors = host.encode_demos(demo_latents, torch.cat([d.conditioning for d in demos]), demos_per_sample=3)
    for key, value in features.by_key.items():
        torch.testing.assert_close(neighbors[key], value, rtol=1e-4, atol=1e-4, msg=f"demo features of {key}")
    t = float(base.model_sampling.timestep(sigma))
    with host.neighbor_attention(adapter, neighbors):
        host_denoised = x - eps(host, x / (sigma**2 + 1).sqrt(), cond, t) * sigma
    assert (comfy_denoised - comfy_plain).abs().max() > 1e-2, "the adapter must matter for this test to mean anything"
    torch.testing.assert_close(host_denoised, comfy_denoised, rtol=1e-4, atol=1e-4)


def test_shipped_adapter_is_listed_and_fits_the_toy_base(comfy_toy, suti_pack):
    (model, _, _), patching = comfy_toy
    loaders = importlib.import_module(f"{suti_pack.__name__}.nodes.loaders")
    loaders.register_pack_adapters()
    assert "suti_toy_adapter.safetensors" in loaders.adapter_choices()
    adapter = loaders.SuTILoadAdapter.execute("suti_toy_adapter.safetensors").args[0]
    patching.check_adapter_for_model(adapter.model, patching.describe_model(model))  # raises on any mismatch
    assert any(m.to_out.weight.abs().sum() > 0 for m in adapter.model.modules() if hasattr(m, "to_out")), "trained"
