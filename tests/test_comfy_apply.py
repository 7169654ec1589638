"""SuTI Apply inside real ComfyUI: tiny random SD1.5 / SD2.x / SDXL UNets sampled through comfy.sample."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

import comfy_helpers as ch

pytestmark = pytest.mark.comfyui

STEPS = 2
DEMO_SIZE = 64  # pixels: 8x8 latents


@pytest.fixture(scope="module")
def suti(suti_pack):
    """The pack's modules, imported as ComfyUI imports the pack."""
    from comfyui_suti.nodes import adapter_patch, apply, demo_encoding, demos, layout, loaders
    from comfyui_suti.suti_core import adapter, demo_features

    return SimpleNamespace(apply=apply, demos=demos, loaders=loaders, layout=layout, adapter_patch=adapter_patch,
                           demo_encoding=demo_encoding, adapter=adapter, demo_features=demo_features)


def run_neighbors(suti, features, patched_or_patch):
    """What the encoding wrapper puts in transformer_options for this apply: features (+ projected kv)."""
    patch = patched_or_patch
    if hasattr(patched_or_patch, "model_options"):
        patches = patched_or_patch.model_options["transformer_options"].get("patches", {})
        patch = (patches.get("middle_patch") or patches.get("attn1_patch"))[0]
    return suti.demo_encoding.project_neighbors(getattr(patch, "adapter_patcher", None), features,
                                                patch.settings.block_map)


def make_demos(suti, tiny: ch.TinyModel, vae, count: int = 3, size: int = DEMO_SIZE, seed: int = 0) -> tuple:
    images = torch.rand(count, 72, 56, 3, generator=torch.Generator().manual_seed(seed))
    captions = "\n".join(f"a photo of sks dog, view {i}" for i in range(count))
    return suti.demos.SuTIDemonstrations.execute(images, captions, vae, tiny.clip, size).result[0]


def zero_adapter(suti, tiny: ch.TinyModel):
    layout = suti.layout.describe_model(tiny.model)
    return suti.adapter_patch.adapter_model_patcher(
        suti.adapter.new_adapter_for_blocks(layout.architecture, layout.context_dim, layout.blocks)
    )


def randomize_adapter_(adapter_patcher, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_patcher.model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def apply_suti(
    suti,
    model,
    demos,
    adapter=None,
    strength=1.0,
    start=0.0,
    end=1.0,
    encoding="once",
    apply_to="cond and uncond",
    block_weights="",
    demo_features="encoder (SuTI)",
    attn_mask=None,
    texture_transfer=None,
):
    texture = {} if texture_transfer is None else {"texture_transfer": texture_transfer}  # None: the node's default
    return suti.apply.SuTIApply.execute(
        model, demos, strength, start, end, encoding, apply_to, demo_features=demo_features, adapter=adapter,
        block_weights=block_weights, attn_mask=attn_mask, **texture,
    ).result[0]


def model_state(model) -> tuple:
    """Everything ModelPatcher state SuTI could touch on the model it was given."""
    return (repr(model.model_options), repr(model.wrappers), repr(model.patches), dict(model.object_patches))


@pytest.fixture
def count_encodings(suti, monkeypatch):
    """Counts calls of encode_demo_features (and keeps the features each call returned)."""
    calls = []
    original = suti.demo_encoding.encode_demo_features

    def counting(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(suti.demo_encoding, "encode_demo_features", counting)
    return calls


# ---------------------------------------------------------------- adapter mode


def test_zero_init_adapter_output_equals_unpatched_output(suti, tiny_unet, tiny_vae):
    demos = make_demos(suti, tiny_unet, tiny_vae)
    base = tiny_unet.sample(steps=STEPS)
    patched = apply_suti(suti, tiny_unet.model, demos, zero_adapter(suti, tiny_unet))
    out = tiny_unet.sample(model=patched, steps=STEPS)
    assert torch.equal(out, base), (
        f"{tiny_unet.arch}: zero-init adapter changed the output by {(out - base).abs().max()}"
    )


@pytest.mark.parametrize(
    "sampler, scheduler", [("dpmpp_2m_sde", "karras"), ("uni_pc", "simple"), ("ddim", "ddim_uniform")]
)
def test_zero_init_adapter_is_identity_with_other_samplers(
    suti, tiny_sd15, tiny_vae, sampler, scheduler, count_encodings
):
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), zero_adapter(suti, tiny_sd15))
    kwargs = {"steps": 3, "sampler": sampler, "scheduler": scheduler}
    assert torch.equal(tiny_sd15.sample(model=patched, **kwargs), tiny_sd15.sample(**kwargs))
    assert len(count_encodings) == 1


def test_non_zero_adapter_changes_output_and_every_block_is_hit(suti, tiny_sd15, tiny_vae):
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    adapter = zero_adapter(suti, tiny_sd15)
    randomize_adapter_(adapter)
    hit = set()
    for spec in adapter.model.metadata.blocks:
        # the query projection runs on every call of a block's neighbor attention
        adapter.model.block(spec.key).to_q.register_forward_hook(lambda m, i, o, key=spec.key: hit.add(key))
    base = tiny_sd15.sample(steps=STEPS)
    out = tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, demos, adapter), steps=STEPS)
    assert not torch.equal(out, base)
    assert torch.isfinite(out).all()
    missing = {s.key for s in adapter.model.metadata.blocks} - hit
    assert not missing, f"patched blocks never ran: {sorted(missing)}"


def test_demos_encoded_exactly_once_per_run(suti, tiny_sd15, tiny_vae, count_encodings):
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), zero_adapter(suti, tiny_sd15))
    tiny_sd15.sample(model=patched, steps=3)
    assert len(count_encodings) == 1, "3 steps with CFG must encode the demos once"
    tiny_sd15.sample(model=patched, steps=3)
    assert len(count_encodings) == 2, "a second run encodes again (no state kept between runs)"


def test_every_step_encoding_runs_once_per_step(suti, tiny_sd15, tiny_vae, count_encodings):
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), encoding="every step")
    out = tiny_sd15.sample(model=patched, steps=3)
    assert len(count_encodings) == 3
    assert torch.isfinite(out).all()


def test_original_model_untouched_after_run(suti, tiny_sd15, tiny_vae):
    before = model_state(tiny_sd15.model)
    weights = {k: v.clone() for k, v in tiny_sd15.model.model.state_dict().items()}
    base = tiny_sd15.sample(steps=STEPS)
    adapter = zero_adapter(suti, tiny_sd15)
    randomize_adapter_(adapter)
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), adapter)
    tiny_sd15.sample(model=patched, steps=STEPS)
    assert model_state(tiny_sd15.model) == before
    assert all(torch.equal(v, weights[k]) for k, v in tiny_sd15.model.model.state_dict().items())
    assert torch.equal(tiny_sd15.sample(steps=STEPS), base), "the unpatched model must still sample as before"


def test_patches_survive_clone_without_copying_tensors(suti, tiny_sd15, tiny_vae):
    adapter = zero_adapter(suti, tiny_sd15)
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), adapter)
    clone = patched.clone()
    patch = clone.model_options["transformer_options"]["patches"]["middle_patch"][0]
    assert patch is patched.model_options["transformer_options"]["patches"]["middle_patch"][0]
    assert patch.models() == [adapter]
    copied = copy.deepcopy(patched.model_options)["transformer_options"]["patches"]["middle_patch"][0]
    assert copied is patch and copy.deepcopy(patch.settings.demos[0]) is patch.settings.demos[0]


def test_batch_two_with_cfg(suti, tiny_sd15, tiny_vae):
    adapter = zero_adapter(suti, tiny_sd15)
    randomize_adapter_(adapter)
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), adapter)
    base = tiny_sd15.sample(batch=2, steps=STEPS, cfg=5.0)
    out = tiny_sd15.sample(model=patched, batch=2, steps=STEPS, cfg=5.0)
    assert out.shape == base.shape == (2, 4, ch.LATENT_SIZE, ch.LATENT_SIZE)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_an_adapter_reading_the_prompt_gets_it_in_a_sampling_run(suti, tiny_sd15, tiny_vae):
    """SuTI Apply hands an adapter that reads the prompt each batch row's prompt tokens (batch 2 with CFG: cond
    and uncond batched together): the sample depends on the adapter's prompt values."""
    layout = suti.layout.describe_model(tiny_sd15.model)
    adapter = suti.adapter_patch.adapter_model_patcher(suti.adapter.new_adapter_for_blocks(
        layout.architecture, layout.context_dim, layout.blocks, reads_prompt=True))
    randomize_adapter_(adapter)
    with torch.no_grad():
        for module in adapter.model.modules():
            if getattr(module, "reads_prompt", False):
                module.to_k_prompt.weight.mul_(30)  # the prompt takes a real share despite PROMPT_LOGIT
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    out = tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, demos, adapter), batch=2, steps=STEPS, cfg=5.0)
    with torch.no_grad():
        for module in adapter.model.modules():
            if getattr(module, "reads_prompt", False):
                module.to_v_prompt.weight.zero_()
    deaf = tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, demos, adapter), batch=2, steps=STEPS, cfg=5.0)
    assert torch.isfinite(out).all() and not torch.allclose(out, deaf, atol=1e-4)


def _run_block(patched, features, x, cond_or_uncond):
    """Run input_blocks.1's transformer block with the patched clone's transformer_options."""
    block = patched.get_model_object("diffusion_model").input_blocks[1][1].transformer_blocks[0]
    features_keys = [key for wrappers in patched.wrappers.values() for key in wrappers]  # keyed by features_key
    options = {
        **patched.model_options["transformer_options"],
        "block": ("input", 1),
        "block_index": 0,
        "sigmas": torch.tensor([1.0]),
        "cond_or_uncond": cond_or_uncond,
        **dict.fromkeys(features_keys, features),
    }
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5)).expand(x.shape[0], -1, -1)
    with torch.no_grad():
        return block(x, context=context, transformer_options=options)


@pytest.mark.parametrize("mode", ["adapter", "training-free"])
@pytest.mark.parametrize("apply_to", ["cond and uncond", "cond only"])
def test_rows_are_independent_when_cond_and_uncond_are_batched_together(suti, tiny_sd15, tiny_vae, mode, apply_to):
    adapter = None
    if mode == "adapter":
        adapter = zero_adapter(suti, tiny_sd15)
        randomize_adapter_(adapter)
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), adapter, apply_to=apply_to)
    raw = suti.demo_features.DemoFeatures({"input_blocks.1.1.transformer_blocks.0": torch.randn(1, 12, 32)})
    features = run_neighbors(suti, raw, patched)
    x = torch.randn(4, 64, 32)  # [uncond, uncond, cond, cond]: batch 2 per chunk
    together = _run_block(patched, features, x, [1, 0])
    uncond, cond = _run_block(patched, features, x[:2], [1]), _run_block(patched, features, x[2:], [0])
    torch.testing.assert_close(together, torch.cat([uncond, cond]))
    plain = _run_block(tiny_sd15.model, None, x, [1, 0])
    assert not torch.equal(cond, plain[2:]), "SuTI must change the cond rows"
    assert torch.equal(uncond, plain[:2]) == (apply_to == "cond only"), "uncond rows are plain only with 'cond only'"


def _residual_patch(suti, tiny, vae):
    adapter = zero_adapter(suti, tiny)
    randomize_adapter_(adapter)
    patched = apply_suti(suti, tiny.model, make_demos(suti, tiny, vae), adapter)
    patch = patched.model_options["transformer_options"]["patches"]["middle_patch"][0]
    raw = suti.demo_features.DemoFeatures({"input_blocks.1.1.transformer_blocks.0": torch.randn(1, 12, 32)})
    features = run_neighbors(suti, raw, patch)
    options = {
        "block": ("input", 1),
        "block_index": 0,
        "sigmas": torch.tensor([1.0]),
        "cond_or_uncond": [0],
        patch.settings.features_key: features,
    }
    return patch, options


def test_sigma_range_gates_the_patch(suti, tiny_sd15, tiny_vae):
    patch, options = _residual_patch(suti, tiny_sd15, tiny_vae)
    x = torch.randn(1, 64, 32)
    sampling = tiny_sd15.model.get_model_object("model_sampling")
    late = {**options, "sigmas": torch.tensor([float(sampling.sigma_min)])}
    patched_gated = apply_suti(suti, tiny_sd15.model, patch.settings.demos, patch.adapter_patcher, start=0.0, end=0.5)
    gated = patched_gated.model_options["transformer_options"]["patches"]["middle_patch"][0]
    late[gated.settings.features_key] = late[patch.settings.features_key]
    assert torch.equal(gated(x, late), x), "outside start..end the patch must do nothing"
    assert not torch.equal(patch(x, late), x)


# ---------------------------------------------------------------- training-free mode


def test_training_free_strength_zero_equals_unpatched(suti, tiny_unet, tiny_vae):
    demos = make_demos(suti, tiny_unet, tiny_vae)
    base = tiny_unet.sample(steps=STEPS)
    out = tiny_unet.sample(model=apply_suti(suti, tiny_unet.model, demos, strength=0.0), steps=STEPS)
    assert torch.equal(out, base)


@pytest.mark.parametrize("mode", ["adapter", "training-free"])
def test_strength_zero_skips_the_demo_encoding(suti, tiny_sd15, tiny_vae, count_encodings, mode):
    adapter = zero_adapter(suti, tiny_sd15) if mode == "adapter" else None
    patched = apply_suti(suti, tiny_sd15.model, make_demos(suti, tiny_sd15, tiny_vae), adapter, strength=0.0)
    tiny_sd15.sample(model=patched, steps=2)
    assert count_encodings == [], "strength 0 must not encode the demos"


# ---------------------------------------------------------------- demo features and subject masks


def test_decoder_features_encode_output_blocks_and_sample(suti, tiny_sd15, tiny_vae, count_encodings):
    layout = suti.layout.describe_model(tiny_sd15.model, "encoder+decoder")
    adapter = suti.adapter_patch.adapter_model_patcher(
        suti.adapter.new_adapter_for_blocks(layout.architecture, layout.context_dim, layout.blocks)
    )
    randomize_adapter_(adapter)
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    patched = apply_suti(suti, tiny_sd15.model, demos, adapter, demo_features="encoder + decoder")
    out = tiny_sd15.sample(model=patched, steps=STEPS)
    assert torch.isfinite(out).all() and not torch.equal(out, tiny_sd15.sample(steps=STEPS))
    recorded = set(count_encodings[0].by_key)
    assert recorded == {b.key for b in layout.blocks} and any(k.startswith("output_blocks") for k in recorded)


def test_subject_masks_restrict_the_neighbors_to_the_subject(suti, tiny_sd15, tiny_vae, count_encodings):
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, 64, 64)
    masks[:, 16:48, 8:40] = 1.0  # the subject's box: 4x4 of the 8x8 latent tokens
    captions = "a dog\na dog on grass\na dog asleep"
    demos = suti.demos.SuTIDemonstrations.execute(images, captions, tiny_vae, tiny_sd15.clip, 64,
                                                  subject_masks=masks).result[0]
    adapter = zero_adapter(suti, tiny_sd15)
    randomize_adapter_(adapter)
    masked = tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, demos, adapter), steps=STEPS)
    plain_demos = make_demos(suti, tiny_sd15, tiny_vae)
    assert torch.isfinite(masked).all()
    mask = count_encodings[0].masks["input_blocks.1.1.transformer_blocks.0"]
    assert mask.shape == (1, 3 * 64) and int(mask.sum()) == 3 * 16, "4x4 subject tokens per demo"
    assert all(d.mask is None for d in plain_demos)


def test_adapter_runs_in_the_unets_dtype(suti, tiny_sd15):
    adapter = zero_adapter(suti, tiny_sd15)
    half = suti.adapter_patch.adapter_in_dtype(adapter, torch.float16)
    assert {p.dtype for p in half.model.parameters()} == {torch.float16}
    assert {p.dtype for p in adapter.model.parameters()} == {torch.float32}, "the loaded adapter stays as it is"
    assert suti.adapter_patch.adapter_in_dtype(adapter, torch.float32) is adapter


def test_training_free_strength_one_changes_output(suti, tiny_sd15, tiny_vae):
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    base = tiny_sd15.sample(steps=STEPS, batch=2)
    out = tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, demos, strength=1.0), steps=STEPS, batch=2)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


# ---------------------------------------------------------------- composition


def test_demo_encoding_sees_lora_weight_patches(suti, tiny_sd15, tiny_vae, count_encodings):
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    plain = apply_suti(suti, tiny_sd15.model, demos, zero_adapter(suti, tiny_sd15))
    tiny_sd15.sample(model=plain, steps=1)
    lora = tiny_sd15.model.clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    weight = lora.get_model_object(key)
    lora.add_patches({key: ("diff", (torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)),))}, 1.0)
    tiny_sd15.sample(model=apply_suti(suti, lora, demos, zero_adapter(suti, tiny_sd15)), steps=1)
    first, second = count_encodings
    block = "input_blocks.2.1.transformer_blocks.0"  # after the LoRA-patched block
    assert not torch.equal(first.by_key[block], second.by_key[block]), "demo features ignored the LoRA patch"


def test_mixed_demo_sizes_encode_and_sample(suti, tiny_sd15, tiny_vae, count_encodings):
    small = make_demos(suti, tiny_sd15, tiny_vae, count=2, size=64)
    images = torch.rand(1, 100, 40, 3)
    mixed = suti.demos.SuTIDemonstrations.execute(images, "a dog", tiny_vae, tiny_sd15.clip, 128, small).result[0]
    assert [d.latent.shape[-1] for d in mixed] == [8, 8, 16]
    out = tiny_sd15.sample(model=apply_suti(suti, tiny_sd15.model, mixed), steps=1)
    assert torch.isfinite(out).all()
    tokens = count_encodings[0].by_key["input_blocks.1.1.transformer_blocks.0"].shape[1]
    assert tokens == 2 * 8 * 8 + 16 * 16


def _with_tiny_controlnet(positive: list, hint_size: int) -> list:
    """Attach a randomly initialised ControlNet (tiny SD1.5 layout) to CONDITIONING, as ControlNetApply does."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm

    config = ch.tiny_unet_config("sd15")
    config.pop("out_channels")
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, **config)
    ch.randomize_weights_(control_model, seed=7)
    control = comfy.controlnet.ControlNet(control_model, load_device=mm.get_torch_device())
    hint = torch.rand(1, 3, hint_size, hint_size, generator=torch.Generator().manual_seed(8))
    return [[cond, {**extra, "control": control.copy().set_cond_hint(hint, 1.0)}] for cond, extra in positive]


def test_composes_with_controlnet(suti, tiny_sd15, tiny_vae):
    demos = make_demos(suti, tiny_sd15, tiny_vae)
    positive = _with_tiny_controlnet(tiny_sd15.cond("a photo"), hint_size=ch.LATENT_SIZE * 8)

    def sample(model):
        return ch.run_ksampler(model, positive, tiny_sd15.cond(""), tiny_sd15.latent(), steps=STEPS)

    control_only = sample(tiny_sd15.model)
    assert not torch.equal(control_only, tiny_sd15.sample(steps=STEPS)), "the ControlNet must act"
    assert torch.equal(sample(apply_suti(suti, tiny_sd15.model, demos, zero_adapter(suti, tiny_sd15))), control_only)
    adapter = zero_adapter(suti, tiny_sd15)
    randomize_adapter_(adapter)
    both = sample(apply_suti(suti, tiny_sd15.model, demos, adapter))
    assert torch.isfinite(both).all() and not torch.equal(both, control_only)


@pytest.mark.parametrize("arch, expected", [("sd15", "sd1"), ("sd20", "sd2"), ("sdxl", "sdxl")])
def test_describe_model_names_architecture_and_blocks(suti, comfyui, arch, expected):
    layout = suti.layout.describe_model(ch.make_tiny_unet(arch))
    assert layout.architecture == expected
    assert len(layout.blocks) == {"sd1": 16, "sd2": 16, "sdxl": 70}[expected]
    assert layout.context_dim == ch.TINY_DIMS[arch]["context_dim"]


def test_model_config_can_name_its_architecture(suti, tiny_sd15):
    tiny_sd15.model.model.model_config.suti_architecture = "toy"
    assert suti.layout.describe_model(tiny_sd15.model).architecture == "toy"


# ---------------------------------------------------------------- per-demo weights


def weighted_demos(suti, tiny: ch.TinyModel, vae, weights: str, keep: tuple[int, ...] = (0, 1, 2)) -> tuple:
    """make_demos' three demos (or those in `keep`), with SuTI Demonstrations' demo_weights."""
    images = torch.rand(3, 72, 56, 3, generator=torch.Generator().manual_seed(0))[list(keep)]
    captions = "\n".join(f"a photo of sks dog, view {i}" for i in keep)
    return suti.demos.SuTIDemonstrations.execute(images, captions, vae, tiny.clip, DEMO_SIZE,
                                                 demo_weights=weights).result[0]


def _sample_weighted(suti, tiny, demos, mode: str) -> torch.Tensor:
    adapter = None
    if mode == "adapter":
        adapter = zero_adapter(suti, tiny)
        randomize_adapter_(adapter)
    return tiny.sample(model=apply_suti(suti, tiny.model, demos, adapter), steps=STEPS, batch=2)


def test_demo_weights_errors_name_the_fix(suti, tiny_sd15, tiny_vae):
    with pytest.raises(ValueError, match="got 3 demo images but 2 demo_weights"):
        weighted_demos(suti, tiny_sd15, tiny_vae, "1, 1")
    with pytest.raises(ValueError, match="every demo_weights entry is 0"):
        weighted_demos(suti, tiny_sd15, tiny_vae, "0, 0, 0")
    assert [d.weight for d in weighted_demos(suti, tiny_sd15, tiny_vae, "1, 0.5, 2")] == [1.0, 0.5, 2.0]


@pytest.mark.parametrize("mode", ["adapter", "training-free"])
def test_equal_demo_weights_change_nothing(suti, tiny_sd15, tiny_vae, mode):
    plain = _sample_weighted(suti, tiny_sd15, make_demos(suti, tiny_sd15, tiny_vae), mode)
    equal = _sample_weighted(suti, tiny_sd15, weighted_demos(suti, tiny_sd15, tiny_vae, "2, 2, 2"), mode)
    assert torch.equal(equal, plain), f"{mode}: equal weights changed the output by {(equal - plain).abs().max()}"


@pytest.mark.parametrize("mode", ["adapter", "training-free"])
def test_weight_zero_demo_equals_running_without_it(suti, tiny_sd15, tiny_vae, mode, count_encodings):
    dropped = _sample_weighted(suti, tiny_sd15, weighted_demos(suti, tiny_sd15, tiny_vae, "2, 0, 1"), mode)
    without = _sample_weighted(suti, tiny_sd15, weighted_demos(suti, tiny_sd15, tiny_vae, "2, 1", (0, 2)), mode)
    assert torch.equal(dropped, without), f"{mode}: weight 0 is not the same as leaving the demo out"
    bias = count_encodings[0].biases["input_blocks.1.1.transformer_blocks.0"]
    assert bias.shape == (1, 2 * 64), "only the two kept demos' 8x8 tokens are neighbors"
    torch.testing.assert_close(bias[0, 64:], torch.full((64,), math.log(0.5)))


@pytest.mark.parametrize("mode", ["adapter", "training-free"])
def test_unequal_demo_weights_change_the_output(suti, tiny_sd15, tiny_vae, mode):
    plain = _sample_weighted(suti, tiny_sd15, make_demos(suti, tiny_sd15, tiny_vae), mode)
    weighted = _sample_weighted(suti, tiny_sd15, weighted_demos(suti, tiny_sd15, tiny_vae, "4, 1, 1"), mode)
    assert torch.isfinite(weighted).all() and not torch.equal(weighted, plain)


@pytest.mark.parametrize("name", ["attention_basic", "attention_pytorch", "attention_split", "attention_sub_quad"])
def test_comfy_attention_adds_a_one_row_float_mask_to_every_querys_logits(suti, name):
    """The contract the adapter and training-free patches rely on: ComfyUI reads a (1, M) float mask as an
    additive bias broadcast to (B, heads, N, M), as suti_core's attention does."""
    import comfy.ldm.modules.attention as comfy_attention
    from comfyui_suti.suti_core.attention_backend import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, generator=gen) for n in (5, 7, 7))  # (B, N or M, H*D), heads=2
    bias = torch.linspace(-2.0, 0.0, 7)[None]  # (1, M)
    out = getattr(comfy_attention, name)(q, k, v, 2, mask=bias)
    torch.testing.assert_close(out, attention(q, k, v, 2, mask=bias), atol=1e-5, rtol=1e-5)
