"""The embedded default: trainer checkpoints resume exactly, the export's one key map is exact (diffusers
UNet == ComfyUI UNet on the same input), and the file loads in real ComfyUI as stock MODEL/CLIP/VAE."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from suti_core.toy.checkpoint import read_toy_base
from suti_core.toy.spec import ToyBaseSpec
from training.keymap import unet_key_map
from training.toy_base import ToyBaseTrainer, run_stage

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "toy" / "suti_toy_base.safetensors"
# Small but with the real layout: 3 levels; 64-channel multiples (ComfyUI's stock ControlNet loader uses 64-wide heads).
TINY = dataclasses.replace(ToyBaseSpec(), image_size=64, unet_channels=(64, 64, 64), context_dim=32, ae_widths=(16, 16))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[ToyBaseTrainer, Path]:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("toy_run")
    trainer = ToyBaseTrainer(TINY, run, batch_size=2, seed=0, ae_batch_size=2)
    trainer.ae_step()
    trainer.latent_scale = trainer.measure_latent_scale(batches=1)
    trainer.base_step()
    for p in trainer.ema["unet"].parameters():  # EMA of one step is ~init; make outputs depend on every weight
        p.data.add_(torch.randn_like(p) * 0.02)
    path = run / "toy.safetensors"
    trainer.export(path)
    return trainer, path


def test_trainer_resumes_from_its_checkpoint(tiny_export, tmp_path):
    trainer, _ = tiny_export
    trainer.save()
    state = ToyBaseTrainer.read_state(trainer.run_dir)
    assert ToyBaseSpec.from_json(state["spec"]) == TINY, "a resumed run must rebuild the model it saved"
    resumed = ToyBaseTrainer(TINY, trainer.run_dir, batch_size=2, seed=123, ae_batch_size=2)
    resumed.load(state)
    assert resumed.step == trainer.step and resumed.latent_scale == trainer.latent_scale
    for a, b in zip(trainer.unet.state_dict().values(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.seed == trainer.seed, "a resumed run must draw the saved run's data stream"


def test_max_timestep_trains_only_the_late_steps(tiny_export, tmp_path):
    """--max-timestep 5: every training timestep is below 5 (a fine-tune of the low-noise end alone)."""
    _, path = tiny_export
    trainer = ToyBaseTrainer(TINY, tmp_path, batch_size=8, seed=0, ae_batch_size=2, max_timestep=5)
    trainer.init_from_export(read_toy_base(path))
    seen: list[torch.Tensor] = []
    trainer.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    for _ in range(3):
        trainer.base_step()
    timesteps = torch.cat(seen)
    assert len(timesteps) == 24 and int(timesteps.max()) < 5
    with pytest.raises(ValueError, match="outside 1..1000"):
        ToyBaseTrainer(TINY, tmp_path, batch_size=2, seed=0, max_timestep=0)


def test_resumed_run_with_render_workers_trains_as_an_unbroken_one(tiny_export, tmp_path):
    """Step k's batch and noise come from (seed, stage, k) alone: resuming, and rendering ahead in worker
    processes, leave the weights exactly as one unbroken in-loop run."""
    _, path = tiny_export

    def trainer(run: Path) -> ToyBaseTrainer:
        t = ToyBaseTrainer(TINY, run, batch_size=2, seed=5, ae_batch_size=2)
        t.init_from_export(read_toy_base(path))
        return t

    unbroken = trainer(tmp_path / "a")
    run_stage(unbroken, "base", unbroken.step["base"] + 2, 5, 5, lambda: None)
    (tmp_path / "b").mkdir()
    first = trainer(tmp_path / "b")
    run_stage(first, "base", first.step["base"] + 1, 5, 5, first.save)
    resumed = ToyBaseTrainer(TINY, tmp_path / "b", batch_size=2, seed=0, ae_batch_size=2)
    resumed.load(ToyBaseTrainer.read_state(tmp_path / "b"))
    run_stage(resumed, "base", unbroken.step["base"], 5, 5, lambda: None, workers=2)
    for (name, a), b in zip(unbroken.unet.state_dict().items(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_export_holds_every_weight_with_its_metadata(tiny_export):
    trainer, path = tiny_export
    ckpt = read_toy_base(path)
    assert ckpt.spec == TINY and ckpt.latent_scale == pytest.approx(trainer.latent_scale)
    assert len(ckpt.unet_state) == len(trainer.unet.state_dict())
    assert set(ckpt.vae_state) == set(trainer.ae.state_dict())
    assert ckpt.unet_state["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].dtype == torch.float16


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"\x80\x04not a safetensors file", "not a readable safetensors file"),
])
def test_read_toy_base_names_bad_files(tmp_path, content, message):
    path = tmp_path / "base.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        read_toy_base(path)


def test_read_toy_base_rejects_other_safetensors(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a SuTI toy base model"):
        read_toy_base(path)


def test_decoder_finetune_changes_only_the_decoder_and_resumes(tiny_export, tmp_path):
    from safetensors import safe_open

    from training import toy_decoder

    _, base = tiny_export
    decoder, steps = toy_decoder.train(base, tmp_path, steps=2, minutes=5, batch_size=2, lr=1e-3, resume=False, seed=0)
    assert steps == 2
    out = tmp_path / "tuned.safetensors"
    toy_decoder.export(decoder, steps, base, out)
    with safe_open(str(base), "pt") as f, safe_open(str(out), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert g.metadata() == f.metadata() | {"decoder_steps": "2"}
        changed = {k for k in f.keys() if not torch.equal(f.get_tensor(k), g.get_tensor(k))}
    assert changed and all(k.startswith("vae.decoder.") for k in changed), sorted(changed)[:5]
    assert read_toy_base(out).latent_scale == read_toy_base(base).latent_scale
    _, resumed = toy_decoder.train(base, tmp_path, steps=3, minutes=5, batch_size=2, lr=1e-3, resume=True, seed=0)
    assert resumed == 3


def test_deepened_decoder_starts_as_the_old_one_and_its_export_loads(tiny_export, tmp_path):
    from training import toy_decoder

    _, base = tiny_export
    ckpt = read_toy_base(base)
    ae = ckpt.autoencoder()
    deeper = toy_decoder.deepen(ae, ckpt.spec, depth=2)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(deeper.decode(deeper.encode(images)), ae.decode(ae.encode(images)))
    decoder, steps = toy_decoder.train(base, tmp_path, steps=1, minutes=5, batch_size=2, lr=1e-3, resume=False, seed=0, depth=2)
    toy_decoder.export(decoder, steps, base, tmp_path / "deep.safetensors")
    tuned = read_toy_base(tmp_path / "deep.safetensors")
    assert tuned.spec == dataclasses.replace(ckpt.spec, ae_decoder_depth=2) and tuned.unet_state.keys() == ckpt.unet_state.keys()
    assert tuned.autoencoder().decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)


def test_decoder_finetune_never_writes_over_its_base(tiny_export, monkeypatch):
    from training import toy_decoder

    _, base = tiny_export
    before = base.read_bytes()
    monkeypatch.setattr("sys.argv", ["toy_decoder", "--base", str(base), "--export", str(base)])
    with pytest.raises(SystemExit, match="--export must differ from --base"):
        toy_decoder.main()
    assert base.read_bytes() == before


# ---------------------------------------------------------------- real ComfyUI

@pytest.fixture(scope="module")
def toy_nodes(suti_pack):
    return importlib.import_module(f"{suti_pack.__name__}.nodes.toy_base")


def test_key_map_equals_comfyui_own_diffusers_map(toy_nodes):
    import comfy.utils

    spec = ToyBaseSpec()
    comfy_map = comfy.utils.unet_to_diffusers(toy_nodes.comfy_unet_config(spec))  # diffusers key -> LDM key
    ours = unet_key_map(len(spec.unet_channels), spec.layers_per_block, (True,) * len(spec.unet_channels))
    from training.keymap import diffusers_to_ldm_key
    from training.toy_base import build_unet

    diffusers_keys = build_unet(spec).state_dict().keys()
    mismatches = {k: (diffusers_to_ldm_key(k, ours), comfy_map.get(k)) for k in diffusers_keys
                  if diffusers_to_ldm_key(k, ours) != comfy_map.get(k)}
    assert not mismatches, f"{len(mismatches)} keys map differently, e.g. {list(mismatches.items())[:3]}"


def test_comfyui_unet_matches_the_diffusers_training_host(tiny_export, toy_nodes):
    trainer, path = tiny_export
    model, clip, vae = toy_nodes.load_toy_base(path)
    host = trainer.ema["unet"]
    host.load_state_dict({k: v.half().float() for k, v in host.state_dict().items()})  # the export is fp16
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    context = torch.randn(2, TINY.max_length, TINY.context_dim)
    with torch.no_grad():
        expected = host(x, t, encoder_hidden_states=context).sample
        got = model.model.diffusion_model(x, t.float(), context=context)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_comfyui_clip_and_vae_wrap_the_toy_modules(tiny_export, toy_nodes):
    _, path = tiny_export
    ckpt = read_toy_base(path)
    model, clip, vae = toy_nodes.load_toy_base(path)
    caption = "a photo of a large dog in the snow"
    with torch.no_grad():
        expected = ckpt.text_encoder()(ckpt.tokenizer()([caption]))
        pixels = torch.rand(1, 64, 64, 3)
        expected_latent = ckpt.autoencoder().encode(pixels.movedim(-1, 1) * 2 - 1)
    torch.testing.assert_close(clip.encode_from_tokens(clip.tokenize(caption)), expected)
    torch.testing.assert_close(vae.encode(pixels), expected_latent, atol=1e-5, rtol=1e-5)
    assert vae.decode(expected_latent).shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_shipped_toy_base_samples_with_stock_ksampler(toy_nodes):
    import comfy.sample

    assert SHIPPED.is_file(), f"{SHIPPED} is missing: the embedded default must ship with the pack"
    model, clip, vae = toy_nodes.load_toy_base(SHIPPED)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a large dog on the beach"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(model, noise, 4, 3.0, "euler", "normal", positive, negative, latent, disable_pbar=True)
    image = vae.decode(out)
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_trainer_continues_from_an_exported_file(tiny_export, tmp_path):
    trainer, path = tiny_export
    fresh = ToyBaseTrainer(TINY, tmp_path, batch_size=2, seed=1, ae_batch_size=2)
    fresh.init_from_export(read_toy_base(path))
    assert fresh.step == trainer.step and fresh.latent_scale == pytest.approx(trainer.latent_scale)
    for name, p in fresh.unet.named_parameters():
        torch.testing.assert_close(p, trainer.ema["unet"].state_dict()[name].half().float(), msg=name)
    fresh.base_step()  # and it trains on
    assert fresh.step["base"] == trainer.step["base"] + 1


def test_init_from_export_refuses_another_architecture(tiny_export, tmp_path):
    _, path = tiny_export
    other = ToyBaseTrainer(dataclasses.replace(TINY, context_dim=64), tmp_path, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="was trained with"):
        other.init_from_export(read_toy_base(path))


def test_pose_controlnet_export_loads_with_stock_loader_and_matches_diffusers(tiny_export, toy_nodes, tmp_path):
    """comfy.controlnet.load_controlnet is what the stock ControlNetLoader node calls."""
    import comfy.controlnet

    from training.toy_controlnet import build_controlnet, export, load_base_unet

    _, path = tiny_export
    ckpt = read_toy_base(path)
    controlnet = build_controlnet(load_base_unet(ckpt))
    torch.manual_seed(0)
    for p in controlnet.parameters():  # zero convs start at 0: perturb so every weight shows in the output
        p.data.add_(torch.randn_like(p) * 0.02)
    export(controlnet, ckpt, tmp_path / "pose.safetensors")
    controlnet.load_state_dict({k: v.half().float() for k, v in controlnet.state_dict().items()})

    comfy_cn = comfy.controlnet.load_controlnet(str(tmp_path / "pose.safetensors"))
    assert comfy_cn is not None, "ComfyUI could not detect the exported ControlNet"
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    hint, context = torch.rand(2, 3, 64, 64), torch.randn(2, TINY.max_length, TINY.context_dim)
    with torch.no_grad():
        down, mid = controlnet(x, t, context, hint, return_dict=False)
        out = comfy_cn.control_model.float()(x, hint, t.float(), context)
    for got, expected in zip(out["output"], down):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["middle"][0], mid, atol=1e-4, rtol=1e-4)


def test_pose_controlnet_trainer_checkpoints_and_resumes(tiny_export, tmp_path):
    from training.toy_controlnet import train

    _, path = tiny_export
    assert train(path, tmp_path, steps=1, minutes=5, batch_size=2, resume=False, seed=0, p_pose_free=0.5).trained_steps == 1
    assert torch.load(tmp_path / "controlnet_state.pt", weights_only=False)["step"] == 1
    resumed = train(path, tmp_path, steps=2, minutes=5, batch_size=2, resume=True, seed=0, p_pose_free=0.5, workers=2)
    assert resumed.trained_steps == 2
    (tmp_path / "unbroken").mkdir()
    unbroken = train(path, tmp_path / "unbroken", steps=2, minutes=5, batch_size=2, resume=False, seed=0, p_pose_free=0.5)
    for (name, a), b in zip(unbroken.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"resumed (render workers) != unbroken at {name}")
