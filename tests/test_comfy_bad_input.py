"""Bad input to the SuTI nodes in real ComfyUI: each case gives a clear message naming the problem and
the fix, the model passed in stays unpatched, and files the user made are left as they were.

| case                               | observed message (fragment asserted below)                               |
|------------------------------------|--------------------------------------------------------------------------|
| no demos                           | no demo images: connect an IMAGE batch with 1 to 16 pictures             |
| one demo                           | (allowed) warning: only one demonstration; 3-5 pictures ... work better  |
| 20 demos                           | 20 demos is more than the limit of 16: every demo adds its tokens ...    |
| mixed sizes / grayscale / RGBA     | (allowed) all demos become size x size RGB                               |
| caption count != demo count        | got 3 demo images but 2 captions; write one caption per line             |
| empty caption                      | caption 2 of 3 is empty; describe demo 2 in its line                     |
| caption of only zero-width chars   | caption 2 of 3 is empty; describe demo 2 in its line                     |
| SDXL adapter on SD1.5 (+ reverse)  | adapter was trained for sdxl (context 64, 70 blocks) but the model is sd1 |
| the shipped toy adapter on SD1.5   | adapter was trained for toy (context 128, 10 blocks) but the model is sd1 |
| truncated safetensors              | ... is probably truncated or corrupt (N bytes): copy or download it again |
| pickle renamed .safetensors        | ... is a pickle/PyTorch checkpoint renamed to .safetensors ...           |
| strength negative / huge           | strength -0.5 is outside 0..2: use 0 (off) to 1 (full SuTI effect)       |
| start > end                        | start_percent 0.8 is after end_percent 0.2: SuTI would never run         |
| bad block_weights (before the run) | block_weights entry 'middle:9': weight must be ... (on that input only)  |
| missing models/suti folder         | SuTI adapter 'x' was not found in <folder>; put the .safetensors there   |
| model without transformer blocks   | the model (UNetModel) has no UNet transformer blocks ...                 |
| demos encoded by another CLIP      | ... text encoder of width 64, but the model expects 32 (sd1) ...         |
| chained demos from two CLIPs       | demo 4 of 4 ('a cat'): its caption was encoded by a text encoder of ...  |
| adapter of the other demo features | the adapter was trained on 'encoder (SuTI)' demo features but ... set it |
| 2 subject masks for 3 images       | got 3 demo images but 2 subject masks; give one mask per image           |
| masks of another size than images  | subject masks are 32x32 but the demo images are 64x64; make each mask ... |
| an empty subject mask              | a subject mask is empty after cropping (no pixel >= 0.5) ...             |
| an all-black attn_mask             | attn_mask 2 of 2 is all black: SuTI would act nowhere in that image ...  |
| attn_mask of another shape         | attn_mask has shape (1, 1, 64, 64); connect a MASK ...                   |
| 2 attn_masks for a batch of 3      | (at sampling) attn_mask holds 2 masks but the latent batch has 3 images  |
"""

from __future__ import annotations

import logging
import pickle
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import comfy_helpers as ch

pytestmark = pytest.mark.comfyui


@dataclass
class Env:
    """Lazily built models, demos and adapter files shared by the cases."""

    suti: SimpleNamespace
    vae: object
    models_dir: Path
    written: dict[str, bytes] = field(default_factory=dict)  # user files a case made, name -> bytes

    @cached_property
    def sd15(self) -> ch.TinyModel:
        return ch.make_tiny_model("sd15")

    @cached_property
    def sdxl(self) -> ch.TinyModel:
        return ch.make_tiny_model("sdxl")

    def demos(self, tiny: ch.TinyModel, images: torch.Tensor, captions: str, previous=None, size: int = 64,
              masks=None):
        node = self.suti.demos.SuTIDemonstrations
        return node.execute(images, captions, self.vae, tiny.clip, size, previous, subject_masks=masks).result[0]

    def three_demos(self, tiny: ch.TinyModel):
        return self.demos(tiny, torch.rand(3, 64, 64, 3), "a dog\na dog on grass\na dog asleep")

    def adapter_for(self, tiny: ch.TinyModel):
        layout = self.suti.layout.describe_model(tiny.model)
        adapter = self.suti.adapter.new_adapter_for_blocks(layout.architecture, layout.context_dim, layout.blocks)
        return self.suti.adapter_patch.adapter_model_patcher(adapter)

    def apply(self, tiny: ch.TinyModel, demos, adapter=None, strength=1.0, start=0.0, end=1.0,
              features="encoder (SuTI)", attn_mask=None):
        node = self.suti.apply.SuTIApply
        return node.execute(tiny.model, demos, strength, start, end, "once", "cond and uncond", demo_features=features,
                            adapter=adapter, block_weights="", attn_mask=attn_mask).result[0]

    def load_adapter_file(self, name: str):
        return self.suti.loaders.SuTILoadAdapter.execute(name).result[0]


@pytest.fixture(scope="module")
def suti(suti_pack):
    from comfyui_suti.nodes import adapter_patch, apply, demos, layout, loaders
    from comfyui_suti.suti_core import adapter

    return SimpleNamespace(apply=apply, demos=demos, loaders=loaders, layout=layout, adapter_patch=adapter_patch,
                           adapter=adapter)


@pytest.fixture
def env(suti, tiny_vae, suti_models_dir) -> Env:
    return Env(suti, tiny_vae, suti_models_dir)


# ---------------------------------------------------------------- cases: each returns what the user sees


def no_demos(env: Env):
    env.demos(env.sd15, torch.zeros(0, 64, 64, 3), "")


def one_demo(env: Env):
    demos = env.demos(env.sd15, torch.rand(1, 64, 64, 3), "a dog")
    assert len(demos) == 1
    env.apply(env.sd15, demos)


def twenty_demos(env: Env):
    env.demos(env.sd15, torch.rand(20, 64, 64, 3), "\n".join(["a dog"] * 20))


def chained_past_the_limit(env: Env):
    first = env.demos(env.sd15, torch.rand(10, 64, 64, 3), "\n".join(["a dog"] * 10))
    env.demos(env.sd15, torch.rand(10, 64, 64, 3), "\n".join(["a dog"] * 10), first)


def mixed_sizes_grayscale_rgba(env: Env):
    gray = env.demos(env.sd15, torch.rand(1, 80, 48, 1), "a dog")
    rgba = env.demos(env.sd15, torch.rand(2, 40, 90, 4), "a dog\na dog again", gray)
    demos = env.demos(env.sd15, torch.rand(1, 128, 128, 3), "a big dog", rgba, size=128)
    assert [tuple(d.latent.shape) for d in demos] == [(1, 4, 8, 8)] * 3 + [(1, 4, 16, 16)]
    assert torch.isfinite(env.sd15.sample(model=env.apply(env.sd15, demos), steps=1)).all()


def caption_count_mismatch(env: Env):
    env.demos(env.sd15, torch.rand(3, 64, 64, 3), "a dog\na dog on grass")


def empty_caption(env: Env):
    env.demos(env.sd15, torch.rand(3, 64, 64, 3), "a dog\n   \na dog asleep")


def zero_width_caption(env: Env):
    env.demos(env.sd15, torch.rand(3, 64, 64, 3), "a dog\n\u200b\u200d\ufeff\na dog asleep")


def sdxl_adapter_on_sd15(env: Env):
    env.apply(env.sd15, env.three_demos(env.sd15), env.adapter_for(env.sdxl))


def sd15_adapter_on_sdxl(env: Env):
    env.apply(env.sdxl, env.three_demos(env.sdxl), env.adapter_for(env.sd15))


def toy_adapter_on_sd15(env: Env):
    shutil.copy(env.suti.loaders.PACK_ADAPTER_DIR / "suti_toy_adapter.safetensors", env.models_dir)
    adapter, info = env.suti.loaders.SuTILoadAdapter.execute("suti_toy_adapter.safetensors").result
    assert "is for the toy base of SuTI Load Toy Base" in info, "SuTI Load Adapter's info names the base first"
    env.apply(env.sd15, env.three_demos(env.sd15), adapter, features="encoder + decoder")


def _saved_adapter(env: Env, name: str) -> Path:
    path = env.models_dir / name
    env.suti.adapter.save_adapter(path, env.adapter_for(env.sd15).model)
    return path


def _user_file(env: Env, name: str, data: bytes) -> str:
    (env.models_dir / name).write_bytes(data)
    env.written[name] = data
    return name


def truncated_safetensors(env: Env):
    whole = _saved_adapter(env, "whole.safetensors").read_bytes()
    env.load_adapter_file(_user_file(env, "truncated.safetensors", whole[:300]))


def pickle_renamed(env: Env):
    env.load_adapter_file(_user_file(env, "pickled.safetensors", pickle.dumps({"to_q.weight": [0.0] * 4})))


def _strength(value: float):
    def case(env: Env):
        assert set(validation_errors(env.suti.apply.SuTIApply, strength=value)) == {"strength"}, (
            "ComfyUI must reject it before the run, on strength"
        )
        env.apply(env.sd15, env.three_demos(env.sd15), strength=value)

    return case


def start_after_end(env: Env):
    env.apply(env.sd15, env.three_demos(env.sd15), start=0.8, end=0.2)


def missing_suti_folder(env: Env):
    env.models_dir.rmdir()
    choices = env.suti.loaders.adapter_choices()
    assert choices == [env.suti.loaders.TRAINING_FREE] and env.models_dir.is_dir(), "the folder is created again"
    message = env.suti.loaders.SuTILoadAdapter.validate_inputs("mine.safetensors")
    assert isinstance(message, str)
    env.load_adapter_file("mine.safetensors")


def model_without_transformer_blocks(env: Env):
    no_attention = ch.make_tiny_model(
        "sd15", transformer_depth=[0] * 8, transformer_depth_middle=-1, transformer_depth_output=[0] * 12
    )
    env.apply(no_attention, env.three_demos(env.sd15))


def demos_from_another_clip(env: Env):
    env.apply(env.sd15, env.three_demos(env.sdxl))


def demos_chained_from_two_clips(env: Env):
    chained = env.demos(env.sdxl, torch.rand(1, 64, 64, 3), "a cat", env.three_demos(env.sd15))
    env.apply(env.sd15, chained)


def adapter_of_other_features(env: Env):
    env.apply(env.sd15, env.three_demos(env.sd15), env.adapter_for(env.sd15), features="encoder + decoder")


def mask_count_mismatch(env: Env):
    env.demos(env.sd15, torch.rand(3, 64, 64, 3), "a dog\na dog on grass\na dog asleep", masks=torch.ones(2, 64, 64))


def mask_size_mismatch(env: Env):
    env.demos(env.sd15, torch.rand(3, 64, 64, 3), "a dog\na dog on grass\na dog asleep", masks=torch.ones(3, 32, 32))


def empty_mask(env: Env):
    masks = torch.ones(3, 64, 64)
    masks[1] = 0.0
    env.demos(env.sd15, torch.rand(3, 64, 64, 3), "a dog\na dog on grass\na dog asleep", masks=masks)


def black_attn_mask(env: Env):
    masks = torch.ones(2, 64, 64)
    masks[1] = 0.0
    env.apply(env.sd15, env.three_demos(env.sd15), attn_mask=masks)


def attn_mask_of_another_shape(env: Env):
    env.apply(env.sd15, env.three_demos(env.sd15), attn_mask=torch.ones(1, 1, 64, 64))


def attn_mask_batch_mismatch(env: Env):
    patched = env.apply(env.sd15, env.three_demos(env.sd15), attn_mask=torch.ones(2, 64, 64))
    env.sd15.sample(model=patched, batch=3, steps=1)


BAD_INPUT = [
    pytest.param(no_demos, "no demo images: connect an IMAGE batch with 1 to 16 pictures", id="no-demos"),
    pytest.param(one_demo, None, id="one-demo"),
    pytest.param(twenty_demos, "20 demos is more than the limit of 16", id="20-demos"),
    pytest.param(chained_past_the_limit, "20 demos is more than the limit of 16", id="20-demos-chained"),
    pytest.param(mixed_sizes_grayscale_rgba, None, id="mixed-sizes-grayscale-rgba"),
    pytest.param(
        caption_count_mismatch, "got 3 demo images but 2 captions; write one caption per line", id="caption-count"
    ),
    pytest.param(empty_caption, "caption 2 of 3 is empty; describe demo 2 in its line", id="empty-caption"),
    pytest.param(zero_width_caption, "caption 2 of 3 is empty; describe demo 2 in its line", id="zero-width-caption"),
    pytest.param(
        sdxl_adapter_on_sd15,
        "adapter was trained for sdxl (context 64, 70 blocks) but the model is sd1 "
        "(context 32, 16 blocks); load an adapter made for this base model",
        id="sdxl-adapter-on-sd15",
    ),
    pytest.param(
        sd15_adapter_on_sdxl,
        "adapter was trained for sd1 (context 32, 16 blocks) but the model is sdxl "
        "(context 64, 70 blocks); load an adapter made for this base model",
        id="sd15-adapter-on-sdxl",
    ),
    pytest.param(
        toy_adapter_on_sd15,
        "adapter was trained for toy (context 128, 10 blocks) but the model is sd1 (context 32, 16 blocks); "
        "load an adapter made for this base model",
        id="toy-adapter-on-sd15",
    ),
    pytest.param(truncated_safetensors, "is probably truncated or corrupt", id="truncated-safetensors"),
    pytest.param(pickle_renamed, "is a pickle/PyTorch checkpoint renamed to .safetensors", id="pickle-renamed"),
    pytest.param(_strength(-0.5), "strength -0.5 is outside 0..2: use 0 (off) to 1", id="negative-strength"),
    pytest.param(_strength(100.0), "strength 100.0 is outside 0..2", id="huge-strength"),
    pytest.param(
        start_after_end, "start_percent 0.8 is after end_percent 0.2: SuTI would never run", id="start-after-end"
    ),
    pytest.param(missing_suti_folder, "SuTI adapter 'mine.safetensors' was not found in", id="missing-suti-folder"),
    pytest.param(model_without_transformer_blocks, "has no UNet transformer blocks", id="no-transformer-blocks"),
    pytest.param(demos_from_another_clip, "text encoder of width 64, but the model expects 32 (sd1)", id="wrong-clip"),
    pytest.param(
        demos_chained_from_two_clips,
        "demo 4 of 4 ('a cat'): its caption was encoded by a text encoder of width 64, but the model expects 32 (sd1)",
        id="wrong-clip-in-chain",
    ),
    pytest.param(
        adapter_of_other_features,
        "the adapter was trained on 'encoder (SuTI)' demo features but demo_features is 'encoder + decoder'; "
        "set demo_features to 'encoder (SuTI)'",
        id="adapter-of-other-features",
    ),
    pytest.param(mask_count_mismatch, "got 3 demo images but 2 subject masks; give one mask per image", id="mask-count"),
    pytest.param(mask_size_mismatch, "subject masks are 32x32 but the demo images are 64x64", id="mask-size"),
    pytest.param(empty_mask, "a subject mask is empty after cropping", id="empty-mask"),
    pytest.param(
        black_attn_mask,
        "attn_mask 2 of 2 is all black: SuTI would act nowhere in that image; paint white where this subject goes, "
        "or disconnect attn_mask to apply it everywhere",
        id="attn-mask-black",
    ),
    pytest.param(attn_mask_of_another_shape, "attn_mask has shape (1, 1, 64, 64); connect a MASK", id="attn-mask-4d"),
    pytest.param(
        attn_mask_batch_mismatch,
        "attn_mask holds 2 masks but the latent batch has 3 images: give one mask for every image, or one per image",
        id="attn-mask-batch",
    ),
]


def _patched_state(env: Env) -> dict[str, tuple]:
    built = [arch for arch in ("sd15", "sdxl") if arch in env.__dict__]  # cached_property values
    return {
        arch: (repr(getattr(env, arch).model.model_options), repr(getattr(env, arch).model.wrappers)) for arch in built
    }


@pytest.mark.parametrize("case, message", BAD_INPUT)
def test_bad_input(env: Env, case, message, caplog):
    if message is None:
        with caplog.at_level(logging.WARNING):
            case(env)
        if case is one_demo:
            assert "only one demonstration; 3-5 pictures of the subject usually work better" in caplog.text
        return
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        case(env)
    assert message in str(err.value), f"observed: {err.value}"
    unpatched = ("{'transformer_options': {}}", "{}")
    for arch, state in _patched_state(env).items():
        assert state == unpatched, f"the {arch} model passed in was patched despite the error: {state}"
    for name, data in env.written.items():
        assert (env.models_dir / name).read_bytes() == data, f"the user's file {name} was changed"


# ---------------------------------------------------------------- which input ComfyUI marks before the run

SUTI_APPLY_WIDGETS = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "demo_encoding": "once",
                      "apply_to": "cond only", "demo_features": "encoder (SuTI)", "block_weights": ""}


def validation_errors(apply_node: type, **widgets) -> dict[str, str]:
    """input name -> 'message: details' of each error ComfyUI's prompt validation marks on SuTI Apply's inputs
    (sockets left unconnected; their 'required input missing' errors are left out)."""
    import asyncio

    import execution

    mappings = execution.nodes.NODE_CLASS_MAPPINGS  # ComfyUI's nodes.py, where validation looks classes up
    previous = mappings.get("SuTIApply")
    mappings["SuTIApply"] = apply_node
    prompt = {"1": {"class_type": "SuTIApply", "inputs": {**SUTI_APPLY_WIDGETS, **widgets}}}
    try:
        _, errors, _ = asyncio.run(execution.validate_inputs("validation", prompt, "1", {}))
    finally:
        if previous is None:
            del mappings["SuTIApply"]
        else:
            mappings["SuTIApply"] = previous
    return {
        e["extra_info"]["input_name"]: f"{e['message']}: {e['details']}"
        for e in errors
        if e["type"] != "required_input_missing"
    }


@pytest.mark.parametrize(
    "widgets, input_name, message",
    [
        ({"block_weights": "middle:9"}, "block_weights", "block_weights entry 'middle:9': weight must be between 0 and 2"),
        ({"block_weights": "top:1"}, "block_weights", "block_weights entry 'top:1' is not 'group:weight'"),
        ({"strength": -0.5}, "strength", "Value -0.5 smaller than min of 0.0"),
        ({"end_percent": 1.5}, "end_percent", "Value 1.5 bigger than max of 1.0"),
    ],
    ids=["block-weight-range", "block-weights-group", "strength", "end-percent"],
)
def test_validation_marks_only_the_input_at_fault(suti, widgets, input_name, message):
    errors = validation_errors(suti.apply.SuTIApply, **widgets)
    assert list(errors) == [input_name], f"ComfyUI marked {sorted(errors)}: {errors}"
    assert message in errors[input_name]
    assert validation_errors(suti.apply.SuTIApply) == {}, "the defaults must pass"
