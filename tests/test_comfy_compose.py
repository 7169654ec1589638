"""SuTI Apply composed with other attention patches in real ComfyUI (tiny random SD1.5 UNets): Self-Attention
Guidance before and after it, two training-free applies in one chain, another pack's replace, PerpNeg."""

from __future__ import annotations

from types import SimpleNamespace

import comfy_helpers as ch
import pytest
import torch
from test_comfy_apply import apply_suti, make_demos, randomize_adapter_, zero_adapter

pytestmark = pytest.mark.comfyui

STEPS = 2
BLOCK = ("input", 1, 0)  # input_blocks.1.1.transformer_blocks.0: 64 tokens, width 32, 2 heads in tiny SD1.5
NEVER = {"start": 1.0, "end": 1.0}  # a sigma range no sampling step falls in


@pytest.fixture(scope="module")
def suti(suti_pack):
    from comfyui_suti.nodes import adapter_patch, apply, demo_encoding, demos, layout, settings
    from comfyui_suti.suti_core import adapter, demo_features

    return SimpleNamespace(apply=apply, demos=demos, layout=layout, adapter_patch=adapter_patch, adapter=adapter,
                           demo_encoding=demo_encoding, demo_features=demo_features, settings=settings)


@pytest.fixture
def encodings(suti, monkeypatch) -> list:
    """Calls of encode_demo_features: the first thing a SuTI run does inside sampling."""
    calls = []
    original = suti.demo_encoding.encode_demo_features
    monkeypatch.setattr(suti.demo_encoding, "encode_demo_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def sag(model, scale: float = 0.5):
    """ComfyUI's Self-Attention Guidance node (V3): an attn1 replace on the middle block + a post-CFG pass."""
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    return SelfAttentionGuidance.execute(model, scale, 2.0).result[0]


def spy_on_replace(model, block: tuple, seen: list):
    """A clone whose attn1 replace on `block` records the (query, key) token counts it is called with."""
    clone = model.clone()
    inner = clone.model_options["transformer_options"]["patches_replace"]["attn1"][block]

    def spy(q, k, v, extra_options):
        seen.append((q.shape[1], k.shape[1]))
        return inner(q, k, v, extra_options)

    clone.set_model_attn1_replace(spy, *block)
    return clone


def _finite_and_different(out: torch.Tensor, *others: torch.Tensor) -> None:
    assert torch.isfinite(out).all()
    for other in others:
        assert not torch.equal(out, other)


# ---------------------------------------------------------------- Self-Attention Guidance


def test_sag_then_training_free_suti_both_act_and_sag_records_the_plain_map(suti, tiny_sd15, tiny_vae):
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    seen = []
    sag_model = spy_on_replace(sag(tiny_sd15.model), ("middle", 0, 0), seen)
    both = tiny_sd15.sample(model=apply_suti(suti, sag_model, demos), steps=STEPS)
    assert seen and all(q == k for q, k in seen), f"SAG saw SuTI's demo tokens (query, key counts): {seen}"
    suti_only = tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, demos), steps=STEPS)
    _finite_and_different(both, suti_only, tiny_sd15.sample(model=sag(tiny_sd15.model), steps=STEPS))
    # SAG at scale 0 only records its map, so SuTI's blend on SAG's block must give SuTI alone's output, up to
    # SAG's own attention rounding (~3e-4 on these ~300-sized latents; SuTI itself moves them by ~4)
    idle_sag = tiny_sd15.sample(model=apply_suti(suti, sag(tiny_sd15.model, scale=0.0), demos), steps=STEPS)
    torch.testing.assert_close(idle_sag, suti_only, rtol=1e-5, atol=2e-3)


def test_sag_after_training_free_suti_raises_before_sampling(suti, tiny_sd15, tiny_vae, encodings):
    patched = sag(apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae)))
    with pytest.raises(ValueError) as err:
        tiny_sd15.sample(model=patched, steps=STEPS)
    message = str(err.value)
    for part in ("middle_block.1.transformer_blocks.0", "nodes_sag.SelfAttentionGuidance",
                 "connect that node before SuTI Apply", "block_weights to 'middle:0'"):
        assert part in message, f"missing {part!r} in: {message}"
    assert encodings == [], "the check must run before sampling starts"


def test_sag_after_suti_runs_when_suti_leaves_the_middle_block(suti, tiny_sd15, tiny_vae):
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    patched = sag(apply_suti(suti, tiny_sd15.model, demos, block_weights="middle:0"))
    out = tiny_sd15.sample(model=patched, steps=STEPS)
    _finite_and_different(out, tiny_sd15.sample(model=sag(tiny_sd15.model), steps=STEPS))


@pytest.mark.parametrize("sag_first", [True, False], ids=["sag-then-suti", "suti-then-sag"])
def test_sag_composes_with_adapter_mode_in_both_orders(suti, tiny_sd15, tiny_vae, sag_first):
    adapter = zero_adapter(suti, tiny_sd15)
    randomize_adapter_(adapter)
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    if sag_first:
        patched = apply_suti(suti, sag(tiny_sd15.model), demos, adapter)
    else:
        patched = sag(apply_suti(suti, tiny_sd15.model, demos, adapter))
    out = tiny_sd15.sample(model=patched, steps=STEPS)
    _finite_and_different(out, tiny_sd15.sample(model=sag(tiny_sd15.model), steps=STEPS))


# ---------------------------------------------------------------- two training-free applies


def test_two_training_free_applies_both_take_effect(suti, tiny_sd15, tiny_vae):
    dog, cat = make_demos(suti, tiny_sd15, tiny_vae, seed=0), make_demos(suti, tiny_sd15, tiny_vae, seed=1)
    model = tiny_sd15.model

    def sample(patched):
        return tiny_sd15.sample(model=patched, steps=STEPS)

    dog_only, cat_only = sample(apply_suti(suti, model, dog)), sample(apply_suti(suti, model, cat))
    both = sample(apply_suti(suti, apply_suti(suti, model, dog), cat))
    _finite_and_different(both, dog_only, cat_only)
    assert torch.equal(sample(apply_suti(suti, apply_suti(suti, model, dog), cat, **NEVER)), dog_only), (
        "a second apply that never fires must leave the first's output exactly as it was"
    )
    assert torch.equal(sample(apply_suti(suti, apply_suti(suti, model, dog, **NEVER), cat)), cat_only), (
        "the first apply's sigma range must hold under a second apply"
    )
    assert torch.equal(sample(apply_suti(suti, apply_suti(suti, model, dog), cat, strength=0.0)), dog_only)
    half_dog = sample(apply_suti(suti, apply_suti(suti, model, dog, strength=0.5), cat))
    assert not torch.equal(half_dog, both), "the first apply's strength must hold under a second apply"


def _block_output(patched, features_by_strength: dict, n: torch.Tensor) -> torch.Tensor:
    """BLOCK's self-attention output (identity projections) with each apply's features, as the block calls it."""
    transformer_options = patched.model_options["transformer_options"]
    options = {"block": BLOCK[:2], "block_index": BLOCK[2], "sigmas": torch.tensor([1.0]), "cond_or_uncond": [1, 0],
               "n_heads": 2, "attn_precision": None}
    for patch in transformer_options["patches"]["attn1_patch"]:
        options[patch.settings.features_key] = features_by_strength[patch.settings.strength]
    q, k, v = n, n, n
    for patch in transformer_options["patches"]["attn1_patch"]:
        q, k, v = patch(q, k, v, options)
    return transformer_options["patches_replace"]["attn1"][BLOCK](q, k, v, options)


@pytest.mark.parametrize("foreign", [False, True], ids=["alone", "over-another-packs-replace"])
def test_chained_applies_add_their_terms_to_the_wrapped_replace(suti, tiny_sd15, tiny_vae, foreign):
    import comfy.ldm.modules.attention as comfy_attention

    def attention(q, k, v, extra_options=None):
        return comfy_attention.optimized_attention(q, k, v, 2)

    model, scale = tiny_sd15.model.clone(), 2.0 if foreign else 1.0
    if foreign:  # another pack's replace for the whole block, under ComfyUI's (name, id) key
        model.set_model_attn1_replace(lambda q, k, v, o: scale * attention(q, k, v), *BLOCK[:2])
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    first, second = apply_suti(suti, model, demos, strength=0.7), apply_suti(suti, model, demos, strength=1.3)
    both = apply_suti(suti, first, demos, strength=1.3)
    generator = torch.Generator().manual_seed(0)
    key = suti.demo_features.block_key(*BLOCK)
    features = {strength: suti.demo_encoding.project_neighbors(
        None, suti.demo_features.DemoFeatures({key: torch.randn(1, tokens, 32, generator=generator)}), {key: key})
        for strength, tokens in ((0.7, 12), (1.3, 20))}
    n = torch.randn(2, 64, 32, generator=generator)
    base = scale * attention(n, n, n)  # what the block computes without SuTI
    terms = [_block_output(m, features, n) - base for m in (first, second)]
    torch.testing.assert_close(_block_output(both, features, n) - base, terms[0] + terms[1])
    assert all(t.abs().max() > 1e-3 for t in terms), "each apply must add a demo term on this block"


# ---------------------------------------------------------------- PerpNeg


def _perpneg_sample(tiny: ch.TinyModel, model) -> torch.Tensor:
    """What PerpNegGuider + SamplerCustomAdvanced do: positive, negative and the empty prompt in one batch."""
    import comfy.samplers
    from comfy_extras.nodes_perpneg import PerpNegGuider

    guider = PerpNegGuider.execute(model, tiny.cond("a photo"), tiny.cond("blurry"), tiny.cond(""), 4.0, 1.0).result[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    noise = torch.randn(tiny.latent()["samples"].shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return guider.sample(noise, tiny.latent()["samples"], comfy.samplers.sampler_object("euler"), sigmas, seed=0)


@pytest.mark.parametrize("apply_to", ["cond and uncond", "cond only"])
def test_perpneg_guider_runs_with_training_free_suti(suti, tiny_sd15, tiny_vae, apply_to):
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), apply_to=apply_to)
    _finite_and_different(_perpneg_sample(tiny_sd15, patched), _perpneg_sample(tiny_sd15, tiny_sd15.model))
    settings = patched.model_options["transformer_options"]["patches"]["attn1_patch"][0].settings
    options = {"sigmas": torch.tensor([1.0]), "cond_or_uncond": [0, 1, 2]}  # positive, negative, PerpNeg's empty
    rows = settings.row_weights("input_blocks.1.1.transformer_blocks.0", torch.zeros(3, 1, 1), options).tolist()
    assert rows == ([1.0, 0.0, 0.0] if apply_to == "cond only" else [1.0, 1.0, 1.0]), "'cond only': only positive"
