"""What the SuTI nodes tell the user besides their main output, in real ComfyUI: the demo preview, the demo size
chosen for the checkpoint, which base model an adapter file is for, and the demo encoding's progress and time."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.comfyui

DEMO_SIZE = 64
CAPTIONS = "a dog\na dog on grass\na dog asleep"


@pytest.fixture(scope="module")
def suti(suti_pack):
    from comfyui_suti.nodes import apply, demos, layout, loaders, toy_base
    from comfyui_suti.suti_core import adapter

    return SimpleNamespace(apply=apply, demos=demos, layout=layout, loaders=loaders, toy_base=toy_base,
                           adapter=adapter)


def demonstrations(suti, images, clip, vae, size=DEMO_SIZE, previous=None, masks=None):
    """(demos, demo_preview) of SuTI Demonstrations."""
    return suti.demos.SuTIDemonstrations.execute(images, CAPTIONS, vae, clip, size, previous,
                                                 subject_masks=masks).result


# ---------------------------------------------------------------- demo_preview


def test_demo_preview_is_the_center_crop_the_vae_encodes(suti, tiny_sd15, tiny_vae):
    images = torch.rand(3, 96, DEMO_SIZE, 3, generator=torch.Generator().manual_seed(0))  # short side = size: no resize
    demos, preview = demonstrations(suti, images, tiny_sd15.clip, tiny_vae)
    assert preview.shape == (3, DEMO_SIZE, DEMO_SIZE, 3)
    assert torch.equal(preview, images[:, 16:80]), "the preview must be the centre 64 rows, unchanged"
    assert torch.equal(demos[1].latent, tiny_vae.encode(preview[1:2]).cpu()), "the VAE must encode what is shown"


def test_demo_preview_dims_what_the_subject_masks_leave_out(suti, tiny_sd15, tiny_vae):
    images = torch.rand(3, DEMO_SIZE, DEMO_SIZE, 3, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(3, DEMO_SIZE, DEMO_SIZE)
    masks[:, 8:40, 16:48] = 1.0
    _, preview = demonstrations(suti, images, tiny_sd15.clip, tiny_vae, masks=masks)
    subject = masks.bool()
    assert torch.equal(preview[subject], images[subject]), "the subject stays as it is"
    dimmed = images[~subject] * suti.demos.PREVIEW_DIM
    torch.testing.assert_close(preview[~subject], dimmed, msg="the rest is dimmed")


def test_demo_preview_shows_only_this_nodes_demos_as_rgb(suti, tiny_sd15, tiny_vae):
    first, _ = demonstrations(suti, torch.rand(3, DEMO_SIZE, DEMO_SIZE, 3), tiny_sd15.clip, tiny_vae)
    demos, preview = demonstrations(suti, torch.rand(3, 80, 48, 4), tiny_sd15.clip, tiny_vae, size=128,
                                    previous=first)
    assert len(demos) == 6
    assert preview.shape == (3, 128, 128, 3), "RGBA demos are previewed as the RGB the VAE encodes, at this size"
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0


# ---------------------------------------------------------------- size 0 = auto


def comfy_clip(model_config: str):
    """The comfy.sd.CLIP a checkpoint of ComfyUI's `model_config` class loads (text encoders unweighted)."""
    import comfy.sd
    import comfy.supported_models

    config_class = getattr(comfy.supported_models, model_config)
    return comfy.sd.CLIP(target=config_class(dict(config_class.unet_config)).clip_target())


@pytest.mark.parametrize("model_config, size", [("SD15", 512), ("SD20", 512), ("SDXL", 1024), ("SDXLRefiner", 1024)])
def test_auto_size_follows_the_checkpoints_clip(suti, comfyui, model_config, size, caplog):
    with caplog.at_level(logging.INFO):
        assert suti.demos.native_demo_size(comfy_clip(model_config)) == size
    assert f"SuTI: demo size auto: {size} px" in caplog.text


def test_auto_size_makes_toy_base_demos_at_its_native_128(suti, comfyui):
    _, clip, vae = suti.toy_base.load_toy_base(suti.toy_base.TOY_MODELS_DIR / "suti_toy_base.safetensors")
    demos, preview = demonstrations(suti, torch.rand(3, 300, 200, 3), clip, vae, size=suti.demos.AUTO_SIZE)
    assert preview.shape == (3, 128, 128, 3)
    assert [tuple(d.latent.shape) for d in demos] == [(1, 4, 16, 16)] * 3


def test_auto_size_falls_back_to_512_with_a_warning_for_an_unknown_clip(suti, tiny_sdxl, caplog):
    with caplog.at_level(logging.WARNING):
        assert suti.demos.native_demo_size(tiny_sdxl.clip) == 512
    assert "cannot tell the checkpoint's image size from its text encoder (TinyCLIP)" in caplog.text


@pytest.mark.parametrize("size, ok", [(0, True), (64, True), (2048, True), (32, False), (100, False), (4096, False)])
def test_size_validation_accepts_auto_and_multiples_of_8(suti, size, ok):
    result = suti.demos.SuTIDemonstrations.validate_inputs(size=size)
    assert result is True if ok else result == f"size {size} must be 0 (auto) or a multiple of 8 between 64 and 2048"


# ---------------------------------------------------------------- which base model an adapter is for


def test_shipped_adapter_info_names_the_toy_base(suti, comfyui, caplog):
    suti.loaders.register_pack_adapters()
    with caplog.at_level(logging.INFO):
        adapter, info = suti.loaders.SuTILoadAdapter.execute("suti_toy_adapter.safetensors").result
    assert adapter.model.metadata.architecture == "toy"
    assert info == ("suti_toy_adapter.safetensors is for the toy base of SuTI Load Toy Base: toy (context 128, "
                    "10 blocks), trained with demo_features 'encoder + decoder'")
    assert f"SuTI: {info}" in caplog.text


def test_adapter_info_names_sdxl_and_training_free(suti, tiny_sdxl, suti_models_dir):
    layout = suti.layout.describe_model(tiny_sdxl.model)
    made = suti.adapter.new_adapter_for_blocks(layout.architecture, layout.context_dim, layout.blocks)
    suti.adapter.save_adapter(suti_models_dir / "mine.safetensors", made)
    _, info = suti.loaders.SuTILoadAdapter.execute("mine.safetensors").result
    assert info == "mine.safetensors is for SDXL: sdxl (context 64, 70 blocks), trained with demo_features 'encoder (SuTI)'"
    assert suti.loaders.SuTILoadAdapter.execute(suti.loaders.TRAINING_FREE).result == (
        None, "none (training-free): no learned weights; works with any SD1.x / SD2.x / SDXL model")


def test_outputs_are_appended_so_saved_links_keep_their_slots(suti):
    outputs = {node.define_schema().node_id: [o.display_name for o in node.define_schema().outputs]
               for node in (suti.demos.SuTIDemonstrations, suti.loaders.SuTILoadAdapter)}
    assert outputs == {"SuTIDemonstrations": ["demos", "demo_preview"], "SuTILoadAdapter": ["adapter", "info"]}


# ---------------------------------------------------------------- demo encoding: progress and time


@pytest.fixture
def progress_bars(monkeypatch):
    """Every comfy.utils.ProgressBar made, with the updates it got."""
    import comfy.utils

    made = []

    class CountingBar:
        def __init__(self, total, node_id=None):
            self.total, self.updates = total, 0
            made.append(self)

        def update(self, value):
            self.updates += value

    monkeypatch.setattr(comfy.utils, "ProgressBar", CountingBar)
    return made


def sample_with_suti(suti, tiny, vae, encoding: str, steps: int = 3) -> None:
    demos, _ = demonstrations(suti, torch.rand(3, DEMO_SIZE, DEMO_SIZE, 3), tiny.clip, vae)
    patched = suti.apply.SuTIApply.execute(tiny.model, demos, 1.0, 0.0, 1.0, encoding, "cond only",
                                           demo_features="encoder (SuTI)").result[0]
    tiny.sample(model=patched, steps=steps)


def test_once_encoding_shows_one_bar_over_the_demos(suti, tiny_sd15, tiny_vae, progress_bars):
    sample_with_suti(suti, tiny_sd15, tiny_vae, "once")
    assert [(bar.total, bar.updates) for bar in progress_bars] == [(3, 3)]


def test_every_step_encoding_leaves_the_samplers_progress_bar_alone(suti, tiny_sd15, tiny_vae, progress_bars):
    sample_with_suti(suti, tiny_sd15, tiny_vae, "every step")
    assert progress_bars == [], f"{len(progress_bars)} progress bars made during 3 steps; each resets the sampler's"


def test_once_encoding_logs_its_time_once_per_run(suti, tiny_sd15, tiny_vae, caplog):
    with caplog.at_level(logging.INFO):
        sample_with_suti(suti, tiny_sd15, tiny_vae, "once")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SuTI: encoded")]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"SuTI: encoded 3 demos \(demo_features 'encoder \(SuTI\)'\) in \d+\.\d\d s", lines[0])


def test_every_step_encoding_logs_no_time_per_step(suti, tiny_sd15, tiny_vae, caplog):
    with caplog.at_level(logging.INFO):
        sample_with_suti(suti, tiny_sd15, tiny_vae, "every step")
    assert "SuTI: encoded" not in caplog.text
