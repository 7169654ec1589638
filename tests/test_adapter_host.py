"""The diffusers training host of the SuTI adapter computes what ComfyUI's SuTI Apply computes."""
from __future__ import annotations

import importlib
import math
from dataclasses import astuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from suti_core.adapter import load_adapter, save_adapter
from suti_core.demo_features import FEATURE_SOURCES, feature_source_of
from suti_core.toy.checkpoint import read_toy_base
from training.adapter_host import DiffusersSuTIHost
from training.toy_base import ddpm_alphas_cumprod
from training.toy_controlnet import load_base_unet

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "models/toy/suti_toy_base.safetensors"


@pytest.fixture(scope="module")
def host() -> DiffusersSuTIHost:
    return DiffusersSuTIHost(load_base_unet(read_toy_base(SHIPPED_BASE)), ddpm_alphas_cumprod())


def random_adapter(host: DiffusersSuTIHost, seed: int = 0):
    """An adapter whose every weight (the zero-initialised output included) is random: every block matters (the
    prompt's keys large enough that its tokens take a real share of the attention despite PROMPT_LOGIT)."""
    adapter = host.new_adapter()
    generator = torch.Generator().manual_seed(seed)
    for name, p in adapter.named_parameters():
        p.data = torch.randn(p.shape, generator=generator) * (3.0 if "to_k_prompt" in name else 0.1)
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
    assert set(both.by_key) == host.source_keys and both.masks is None
    for key, features in both.by_key.items():
        tokens = second.by_key[key].shape[1] // 3
        assert features.shape == (2, 3 * tokens, second.by_key[key].shape[2])
        torch.testing.assert_close(features[1:], second.by_key[key], rtol=1e-4, atol=1e-5)
        one_demo = host.encode_demos(latents[4:5], context[4:5], demos_per_sample=1).by_key[key]
        torch.testing.assert_close(features[1:, tokens: 2 * tokens], one_demo, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- against ComfyUI

@pytest.fixture(scope="module")
def comfy_toy(suti_pack):
    """(model, clip, vae) of the shipped toy base loaded by the pack's loader, and the pack's node modules."""
    toy_base = importlib.import_module(f"{suti_pack.__name__}.nodes.toy_base")
    nodes = SimpleNamespace(**{name: importlib.import_module(f"{suti_pack.__name__}.nodes.{name}")
                               for name in ("layout", "settings", "demo_encoding", "adapter_patch", "demos")})
    return toy_base.load_toy_base(SHIPPED_BASE), nodes


@pytest.mark.parametrize("source", FEATURE_SOURCES)
def test_block_layout_is_what_comfyui_reports(comfy_toy, source):
    (model, _, _), nodes = comfy_toy
    host = DiffusersSuTIHost(load_base_unet(read_toy_base(SHIPPED_BASE)), ddpm_alphas_cumprod(), feature_source=source)
    layout = nodes.layout.describe_model(model, source)
    assert [astuple(b) for b in layout.blocks] == [astuple(b) for b in host.block_specs]  # the pack has its own copy of suti_core
    assert (layout.architecture, layout.context_dim) == (host.architecture, host.context_dim)
    assert host.new_adapter().metadata.block_map == layout.block_map


def _comfy_denoised(nodes, model, demos, adapter, source, x, sigma, cond, cond_only):
    """SuTI Apply's path in ComfyUI (the pack's demo encoding, per-run projection and middle_patch) for a batch
    [uncond-labelled row, cond-labelled row] of the same latent."""
    base = model.model
    layout = nodes.layout.describe_model(model, source)
    settings = nodes.settings.SuTISettings("suti_test", tuple(demos), layout.source_keys, layout.block_map, 1.0,
                                           math.inf, 0.0, {"input": 1.0, "middle": 1.0, "output": 1.0}, cond_only)
    sigma_min = base.model_sampling.sigma_min.reshape(1)
    features = nodes.demo_encoding.encode_demo_features(base, demos, layout.source_keys, sigma_min, torch.device("cpu"))
    adapter_patcher = nodes.adapter_patch.adapter_model_patcher(adapter)
    run = nodes.demo_encoding.project_neighbors(adapter_patcher, features, layout.block_map)
    patch = nodes.adapter_patch.NeighborResidualPatch(adapter_patcher, settings)
    options = {"patches": {"middle_patch": [patch]}, "suti_test": run, "sigmas": sigma.repeat(2),
               "cond_or_uncond": [1, 0]}
    if adapter.metadata.reads_prompt:  # as install_suti adds it
        extension = importlib.import_module("comfy.patcher_extension")
        extension.add_wrapper_with_key(extension.WrappersMP.APPLY_MODEL, "suti_test", nodes.adapter_patch.PassPrompt(),
                                       options)
    with torch.no_grad():
        return base.apply_model(x.repeat(2, 1, 1, 1), sigma.repeat(2), c_crossattn=cond.repeat(2, 1, 1),
                                transformer_options=options), features


@pytest.mark.parametrize("source", FEATURE_SOURCES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cond_only", [False, True])
@pytest.mark.parametrize("finest_heads, reads_prompt", [(0, False), (8, False), (0, True)])
def test_host_prediction_equals_comfyui_suti_apply_with_the_saved_adapter(comfy_toy, tmp_path, source, masked, cond_only,
                                                                          finest_heads, reads_prompt):
    """Same demos (with or without subject masks), adapter file, noisy latent, sigma and caption, for each demo
    feature source, adapter width at the finest level and an adapter reading the prompt: the diffusers host's
    denoised latent equals the one ComfyUI computes with the pack's own demo encoding, middle_patch (and the
    wrapper passing it the prompt); with `cond only` the uncond row stays the plain model's."""
    (model, clip, vae), nodes = comfy_toy
    host = DiffusersSuTIHost(load_base_unet(read_toy_base(SHIPPED_BASE)), ddpm_alphas_cumprod(), feature_source=source,
                             finest_heads=finest_heads, reads_prompt=reads_prompt)
    save_adapter(tmp_path / "adapter.safetensors", random_adapter(host, seed=3))
    adapter = load_adapter(tmp_path / "adapter.safetensors")
    base = model.model
    pixels = torch.rand(3, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(3, 128, 128)
    for i in range(3):
        masks[i, 16 * i: 16 * i + 64, 20: 90] = 1.0  # a subject box per demo
    captions = "a photo of a dog\na dog in the snow\na small dog"
    demos = nodes.demos.make_demonstrations(pixels, captions, vae, clip, 128, masks if masked else None)
    sigma = torch.tensor([3.0])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * (sigma**2 + 1).sqrt()
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a dog on the beach"))[0][0]
    comfy_denoised, features = _comfy_denoised(nodes, model, demos, adapter, source, x, sigma, cond, cond_only)
    with torch.no_grad():
        comfy_plain = base.apply_model(x, sigma, c_crossattn=cond)

    demo_latents = torch.cat([base.process_latent_in(d.latent) for d in demos])
    torch.testing.assert_close(demo_latents, torch.cat([d.latent for d in demos]) * read_toy_base(SHIPPED_BASE).latent_scale)
    neighbors = host.encode_demos(demo_latents, torch.cat([d.conditioning for d in demos]), demos_per_sample=3,
                                  masks=list(masks) if masked else None)
    assert (neighbors.masks is not None) == masked and (features.masks is not None) == masked
    for key, value in features.by_key.items():
        torch.testing.assert_close(neighbors.by_key[key], value, rtol=1e-4, atol=1e-4, msg=f"demo features of {key}")
        if masked:
            assert torch.equal(neighbors.masks[key], features.masks[key]), f"subject token mask of {key}"
    t = float(base.model_sampling.timestep(sigma))
    with host.neighbor_attention(adapter, neighbors):
        host_denoised = x - eps(host, x / (sigma**2 + 1).sqrt(), cond, t) * sigma
    assert (comfy_denoised[1:] - comfy_plain).abs().max() > 1e-2, "the adapter must matter for this test to mean anything"
    torch.testing.assert_close(host_denoised, comfy_denoised[1:], rtol=1e-4, atol=1e-4)
    if reads_prompt:  # and the prompt must matter to it, or a wrong prompt in ComfyUI would pass unseen
        for module in adapter.modules():
            if getattr(module, "reads_prompt", False):
                module.to_v_prompt.weight.data.zero_()
        with host.neighbor_attention(adapter, neighbors):
            deaf = x - eps(host, x / (sigma**2 + 1).sqrt(), cond, t) * sigma
        assert (deaf - host_denoised).abs().max() > 1e-2
    uncond_row = comfy_denoised[:1]
    if cond_only:
        torch.testing.assert_close(uncond_row, comfy_plain, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(uncond_row, comfy_denoised[1:], rtol=1e-5, atol=1e-5)


def test_shipped_adapter_is_listed_and_fits_the_toy_base(comfy_toy, suti_pack):
    (model, _, _), nodes = comfy_toy
    loaders = importlib.import_module(f"{suti_pack.__name__}.nodes.loaders")
    loaders.register_pack_adapters()
    assert "suti_toy_adapter.safetensors" in loaders.adapter_choices()
    adapter = loaders.SuTILoadAdapter.execute("suti_toy_adapter.safetensors").args[0]
    source = feature_source_of(adapter.model.metadata.block_map)
    nodes.layout.check_adapter_for_model(adapter.model, nodes.layout.describe_model(model, source))  # raises on mismatch
    assert any(m.to_out.weight.abs().sum() > 0 for m in adapter.model.modules() if hasattr(m, "to_out")), "trained"
