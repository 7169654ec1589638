"""SuTI Apply's attn_mask in real ComfyUI (tiny random SD1.5 UNets): a subject's term acts only on the tokens its
region mask covers, in adapter and training-free mode; two applies with complementary masks share one image."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_comfy_apply import apply_suti, make_demos, randomize_adapter_, run_neighbors, zero_adapter

pytestmark = pytest.mark.comfyui

STEPS = 2
BLOCK = ("input", 1, 0)  # input_blocks.1.1.transformer_blocks.0: width 32, 2 heads in tiny SD1.5
GRID = 8  # the patch-level tests' token grid: 8x8 = 64 tokens
LEFT = torch.arange(GRID * GRID) % GRID < GRID // 2  # tokens of the left half, row-major as ComfyUI flattens
MODES = ["adapter", "training-free"]


@pytest.fixture(scope="module")
def suti(suti_pack):
    from comfyui_suti.nodes import adapter_patch, apply, demo_encoding, demos, layout, regions
    from comfyui_suti.suti_core import adapter, demo_features

    return SimpleNamespace(apply=apply, demos=demos, layout=layout, adapter_patch=adapter_patch, adapter=adapter,
                           demo_encoding=demo_encoding, demo_features=demo_features, regions=regions)


def half_mask(side: str, size: int = 128) -> torch.Tensor:
    """MASK (1, size, size): white on the left or right half."""
    mask = torch.zeros(1, size, size)
    mask[..., : size // 2] = 1.0
    return mask if side == "left" else 1.0 - mask


def _adapter_or_none(suti, tiny, mode: str):
    if mode == "training-free":
        return None
    adapter = zero_adapter(suti, tiny)
    randomize_adapter_(adapter)
    return adapter


def _plain(mode: str, x: torch.Tensor) -> torch.Tensor:
    """BLOCK's output without SuTI in `_block_call`'s terms: x itself, or plain self-attention over x."""
    import comfy.ldm.modules.attention as comfy_attention

    return x if mode == "adapter" else comfy_attention.optimized_attention(x, x, x, 2)


def _block_call(suti, patched, raw_features, x: torch.Tensor) -> torch.Tensor:
    """BLOCK as the patches see it, identity projections: every middle_patch on x (adapter mode), or the attn1
    patches then the attn1 replace on q = k = v = x (training-free); each apply gets `raw_features`."""
    transformer_options = patched.model_options["transformer_options"]
    patches = transformer_options["patches"]
    options = {"block": BLOCK[:2], "block_index": BLOCK[2], "sigmas": torch.tensor([1.0]), "cond_or_uncond": [1, 0],
               "activations_shape": [x.shape[0], x.shape[2], GRID, GRID], "n_heads": 2, "attn_precision": None}
    applied = patches.get("middle_patch") or patches.get("attn1_patch")
    for patch in applied:
        options[patch.settings.features_key] = run_neighbors(suti, raw_features, patch)
    if "middle_patch" in patches:
        for patch in applied:
            x = patch(x, options)
        return x
    q, k, v = x, x, x
    for patch in applied:
        q, k, v = patch(q, k, v, options)
    return transformer_options["patches_replace"]["attn1"][BLOCK](q, k, v, options)


@pytest.fixture
def block_inputs(suti):
    """Demo features for BLOCK and its hidden states: [uncond, uncond, cond, cond] (batch 2 per chunk)."""
    generator = torch.Generator().manual_seed(0)
    key = suti.demo_features.block_key(*BLOCK)
    raw = suti.demo_features.DemoFeatures({key: torch.randn(1, 12, 32, generator=generator)})
    return raw, torch.randn(4, GRID * GRID, 32, generator=generator)


# ---------------------------------------------------------------- the rule at the patch level


@pytest.mark.parametrize("mode", MODES)
def test_tokens_outside_the_mask_are_unchanged_by_the_subject(suti, tiny_sd15, tiny_vae, block_inputs, mode):
    adapter, demos = _adapter_or_none(suti, tiny_sd15, mode), make_demos(suti, tiny_sd15, tiny_vae)
    raw, x = block_inputs
    plain = _plain(mode, x)
    everywhere = _block_call(suti, apply_suti(suti, tiny_sd15.model, demos, adapter), raw, x)
    left = _block_call(suti, apply_suti(suti, tiny_sd15.model, demos, adapter, attn_mask=half_mask("left")), raw, x)
    assert (everywhere - plain)[:, ~LEFT].abs().max() > 1e-3, "the subject must act on the right half unmasked"
    torch.testing.assert_close(left[:, ~LEFT], plain[:, ~LEFT], rtol=0, atol=1e-6,
                               msg="tokens outside the mask were changed by the subject's term")
    torch.testing.assert_close(left[:, LEFT], everywhere[:, LEFT], rtol=0, atol=1e-6,
                               msg="tokens inside a white mask must get the full term")


@pytest.mark.parametrize("mode", MODES)
def test_complementary_masks_compose_half_by_half(suti, tiny_sd15, tiny_vae, block_inputs, mode):
    """Chained applies, dog on the left, cat on the right: each half is that subject's apply alone."""
    adapter = _adapter_or_none(suti, tiny_sd15, mode)
    dog, cat = make_demos(suti, tiny_sd15, tiny_vae, seed=0), make_demos(suti, tiny_sd15, tiny_vae, seed=1)
    raw, x = block_inputs
    model = tiny_sd15.model
    dog_left = apply_suti(suti, model, dog, adapter, attn_mask=half_mask("left"))
    both = _block_call(suti, apply_suti(suti, dog_left, cat, adapter, attn_mask=half_mask("right")), raw, x)
    dog_only, cat_only = (_block_call(suti, apply_suti(suti, model, d, adapter), raw, x) for d in (dog, cat))
    torch.testing.assert_close(both[:, LEFT], dog_only[:, LEFT], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[:, ~LEFT], cat_only[:, ~LEFT], rtol=0, atol=1e-5)


def test_soft_mask_scales_the_term_by_the_area_it_covers(suti, tiny_sd15, tiny_vae, block_inputs):
    """A token half covered by the mask (an area resize to the block's grid) gets half the term."""
    adapter, demos = _adapter_or_none(suti, tiny_sd15, "adapter"), make_demos(suti, tiny_sd15, tiny_vae)
    raw, x = block_inputs
    mask = torch.zeros(1, 16, 16)
    mask[:, :, 0] = 1.0  # first pixel column of 16: half of the first token column at 8x8
    soft = _block_call(suti, apply_suti(suti, tiny_sd15.model, demos, adapter, attn_mask=mask), raw, x)
    full = _block_call(suti, apply_suti(suti, tiny_sd15.model, demos, adapter), raw, x)
    first_column = torch.arange(GRID * GRID) % GRID == 0
    torch.testing.assert_close((soft - x)[:, first_column], 0.5 * (full - x)[:, first_column])
    assert torch.equal(soft[:, ~first_column], x[:, ~first_column])


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("mode", MODES)
def test_white_mask_equals_no_mask_and_a_half_mask_acts(suti, tiny_sd15, tiny_vae, mode):
    adapter, demos = _adapter_or_none(suti, tiny_sd15, mode), make_demos(suti, tiny_sd15, tiny_vae)

    def sample(**kwargs):
        return tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, demos, adapter, **kwargs), steps=STEPS)

    everywhere = sample()
    assert torch.equal(sample(attn_mask=torch.ones(1, 128, 128)), everywhere), "a white mask must change nothing"
    left = sample(attn_mask=half_mask("left"))
    base = tiny_sd15.sample(steps=STEPS)
    assert torch.isfinite(left).all() and not torch.equal(left, everywhere) and not torch.equal(left, base)


def test_one_mask_per_latent_row(suti, tiny_sd15, tiny_vae):
    adapter, demos = _adapter_or_none(suti, tiny_sd15, "adapter"), make_demos(suti, tiny_sd15, tiny_vae)

    def sample(mask):
        patched = apply_suti(suti, tiny_sd15.model, demos, adapter, attn_mask=mask)
        return tiny_sd15.sample(model=patched, batch=2, steps=STEPS, cfg=4.0)

    white = sample(torch.ones(1, 128, 128))
    per_row = sample(torch.cat([torch.ones(1, 128, 128), half_mask("left")]))
    torch.testing.assert_close(per_row[0], white[0], rtol=0, atol=1e-5, msg="row 0's white mask must act as before")
    assert not torch.allclose(per_row[1], white[1]), "row 1's half mask must change row 1"


def test_two_subjects_with_complementary_masks_sample(suti, tiny_sd15, tiny_vae):
    adapter = _adapter_or_none(suti, tiny_sd15, "adapter")
    dog, cat = make_demos(suti, tiny_sd15, tiny_vae, seed=0), make_demos(suti, tiny_sd15, tiny_vae, seed=1)
    dog_left = apply_suti(suti, tiny_sd15.model, dog, adapter, attn_mask=half_mask("left"))
    both = tiny_sd15.sample(model=apply_suti(suti, dog_left, cat, adapter, attn_mask=half_mask("right")), steps=STEPS)
    dog_only = tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, dog, adapter), steps=STEPS)
    assert torch.isfinite(both).all() and not torch.equal(both, dog_only)
    assert not torch.equal(both, tiny_sd15.sample(model=dog_left, steps=STEPS)), "the right subject must act"
