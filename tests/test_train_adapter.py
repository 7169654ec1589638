"""The adapter trainer: its examples, a few real steps on the shipped base, checkpoints, resume and export."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from suti_core.adapter import load_adapter, new_adapter_for_blocks, save_adapter
from suti_core.adapter_format import AdapterMismatchError
from suti_core.demo_features import feature_source_of
from suti_core.eval.metrics import to_tensor
from suti_core.world import demo_contexts, render
from suti_core.world.subjects import COLOR_NAMES, subject_split
from training.adapter_host import DiffusersSuTIHost
from training.toy_base import noised
from training.train_adapter import AdapterRecipe, AdapterTrainer, SubjectDemoSampler, step_examples

SMALL = AdapterRecipe(batch_size=2, n_demos=2, lr=1e-3, p_edit=0.3, caption_dropout=0.1)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BASE = ROOT / "models/toy/suti_toy_base.safetensors"


def test_examples_pair_a_subjects_demos_with_a_new_render_of_it():
    batch = SubjectDemoSampler(3, 128, p_edit=0.5, rng=np.random.default_rng(0)).batch(4)
    assert batch.demo_images.shape == (12, 3, 128, 128) and batch.target_images.shape == (4, 3, 128, 128)
    assert len(batch.demo_captions) == 12 and len(batch.target_captions) == 4
    assert all(subject_split(s.id) == "train" for s in batch.subjects)
    for i, subject in enumerate(batch.subjects):
        assert all(subject.shape in c for c in batch.demo_captions[3 * i: 3 * i + 3] + [batch.target_captions[i]])
    assert batch.demo_images.min() >= -1 and batch.demo_images.max() <= 1
    assert len(batch.demo_masks) == 12 and all(m.shape == (128, 128) and m.any() for m in batch.demo_masks)


def test_the_recolour_share_reaches_the_targets_and_their_captions():
    batch = SubjectDemoSampler(1, 128, p_edit=0.0, rng=np.random.default_rng(2), p_recolor=1.0).batch(6)
    for caption in batch.target_captions:
        assert set(caption.split()) & set(COLOR_NAMES), f"{caption!r} names no colour"
    plain = SubjectDemoSampler(1, 128, p_edit=0.0, rng=np.random.default_rng(2)).batch(6)
    assert not any(set(c.split()) & set(COLOR_NAMES) for c in plain.target_captions)


def test_demo_images_are_renders_of_the_subject_in_photo_contexts():
    sampler = SubjectDemoSampler(2, 128, p_edit=0.0, rng=np.random.default_rng(5))
    batch = sampler.batch(1)
    subject = batch.subjects[0]
    rng = np.random.default_rng(5)  # replay the sampler's draws: subject, then the demo seed
    rng.choice(sampler.ids, 1)
    seed = int(rng.integers(2**31 - 2))
    expected = to_tensor([render(subject, c, 128, seed + i) for i, c in enumerate(demo_contexts(2, seed))])
    assert torch.equal(batch.demo_images, expected)


@pytest.fixture(scope="module")
def trainer() -> AdapterTrainer:
    torch.manual_seed(0)
    return AdapterTrainer(SHIPPED_BASE, Accelerator(cpu=True), SMALL)


def test_a_resumed_run_computes_the_losses_an_unbroken_run_does(trainer):
    trainer.start_data_at(0, seed=4)
    with torch.no_grad():
        unbroken = [trainer.loss().item() for _ in range(3)]
        trainer.start_data_at(2, seed=4)
        resumed = trainer.loss().item()
    assert resumed == unbroken[2] and len(set(unbroken)) == 3


def _draws(trainer: AdapterTrainer, seed: int, step: int, process: int, batch_size: int) -> list[tuple]:
    """What `process` draws at `step`: each example's target and its mask, caption and noise choices."""
    recipe = dataclasses.replace(trainer.recipe, batch_size=batch_size)
    draws = step_examples(trainer.sampler, recipe, seed, process, step)
    return [(e.subject, e.target_image.tobytes(), e.target_caption, *choices) for e, *choices in draws]


def test_a_steps_examples_depend_only_on_seed_step_and_their_place_in_the_step(trainer):
    whole = _draws(trainer, seed=1, step=7, process=0, batch_size=2)
    assert whole == _draws(trainer, seed=1, step=7, process=0, batch_size=2)
    assert whole == _draws(trainer, 1, 7, process=0, batch_size=1) + _draws(trainer, 1, 7, process=1, batch_size=1), \
        "2 processes × batch 1 draw the examples 1 process × batch 2 does, process p taking slice p"
    assert whole[0] != whole[1] and whole != _draws(trainer, seed=1, step=8, process=0, batch_size=2)


def test_training_moves_only_the_adapter_and_resumes(trainer, tmp_path):
    base_before = {k: v.clone() for k, v in trainer.host.unet.state_dict().items()}
    trainer.start_data_at(0, seed=0)
    for step in range(1, 3):
        loss = trainer.loss()
        assert torch.isfinite(loss)
        trainer.opt.zero_grad()
        trainer.backward(loss)
        trainer.opt.step()
        trainer.after_step(step)
    assert all(torch.equal(v, trainer.host.unet.state_dict()[k]) for k, v in base_before.items()), "base must stay frozen"
    outputs = [m.to_out.weight for m in trainer.adapter.modules() if hasattr(m, "to_out")]
    assert outputs and all(w.abs().sum() > 0 for w in outputs), "every block's zero-initialised output must train"
    ema = [e for e, p in zip(trainer.ema.parameters(), trainer.adapter.parameters()) if not torch.equal(e, p)]
    assert ema, "the EMA follows the weights with a lag"
    trainer.save(tmp_path, 2)
    log = (tmp_path / "log.jsonl").read_text()
    assert log.count('"loss"') == 1 and log.count('"val_ratio_t900"') == 1
    resumed = AdapterTrainer(SHIPPED_BASE, Accelerator(cpu=True), SMALL)
    assert resumed.load(tmp_path) == 2
    for (k, a), b in zip(trainer.adapter.state_dict().items(), resumed.adapter.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(trainer.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.opt.state_dict()["state"].keys() == trainer.opt.state_dict()["state"].keys()


def test_export_is_a_loadable_adapter_and_never_overwrites_by_accident(trainer, tmp_path):
    path = tmp_path / "suti_toy.safetensors"
    trainer.export(path, overwrite=False)
    adapter = load_adapter(path)
    assert adapter.metadata.architecture == "toy"
    for (k, a), b in zip(trainer.ema.state_dict().items(), adapter.state_dict().values()):
        assert torch.equal(a, b), f"the export holds the EMA weights: {k}"
    with pytest.raises(FileExistsError, match="already exists"):
        trainer.export(path, overwrite=False)
    result = subprocess.run([sys.executable, "-m", "training.train_adapter", "--export", str(path), "--steps", "0"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "--overwrite" in result.stderr


def test_init_from_a_saved_adapter_and_refuse_another_models(trainer, tmp_path):
    path = tmp_path / "start.safetensors"
    trainer.export(path, overwrite=False)
    fresh = AdapterTrainer(SHIPPED_BASE, Accelerator(cpu=True), SMALL)
    fresh.init_from(path)
    for (k, a), b in zip(trainer.ema.state_dict().items(), fresh.adapter.state_dict().values()):
        assert torch.equal(a, b), k
    other = new_adapter_for_blocks("sd1", 768, fresh.host.block_specs)
    save_adapter(tmp_path / "sd1.safetensors", other)
    with pytest.raises(AdapterMismatchError, match="sd1"):
        fresh.init_from(tmp_path / "sd1.safetensors")


def test_init_from_a_narrower_adapter_widens_it_to_the_recipes_finest_heads(trainer, tmp_path):
    """A wider run starts where the narrower file stood: the same denoising, with the added heads to learn."""
    narrow = trainer.host.new_adapter()
    generator = torch.Generator().manual_seed(3)
    for p in narrow.parameters():
        p.data = torch.randn(p.shape, generator=generator) * 0.1
    save_adapter(tmp_path / "narrow.safetensors", narrow)
    wide = AdapterTrainer(SHIPPED_BASE, Accelerator(cpu=True), dataclasses.replace(SMALL, finest_heads=8))
    wide.init_from(tmp_path / "narrow.safetensors")
    heads = {spec.key: spec.heads for spec in wide.adapter.metadata.blocks}
    assert set(heads.values()) == {4, 8} and heads["input_blocks.1.1.transformer_blocks.0"] == 8
    batch = SubjectDemoSampler(2, trainer.size, 0.0, np.random.default_rng(5), split="val").batch(1)
    latents, text = trainer._encode(batch.target_images, batch.target_captions)
    noisy, t = noised(latents, torch.randn(latents.shape, generator=generator), trainer.alphas[600]), torch.tensor([600])
    predictions = []
    for run, adapter in ((trainer, narrow), (wide, wide.adapter), (trainer, trainer.host.new_adapter())):
        with torch.no_grad(), run.host.neighbor_attention(adapter, run._neighbors(batch, [False])):
            predictions.append(run.base.predict_noise(noisy, t, text))
    assert (predictions[0] - predictions[2]).abs().max() > 1e-2, "the narrow adapter must matter for this to mean anything"
    torch.testing.assert_close(predictions[1], predictions[0], rtol=1e-5, atol=1e-5)
    wide.export(tmp_path / "wide.safetensors", overwrite=False)
    with pytest.raises(ValueError, match="cannot widen"):
        trainer.init_from(tmp_path / "wide.safetensors")
    wide.save(tmp_path, step=1)
    with pytest.raises(ValueError, match="--finest-heads 8, not 0; resume with the value it started with"):
        trainer.load(tmp_path)


def test_init_from_a_file_not_reading_the_prompt_adds_zero_projections_and_resume_keeps_the_choice(trainer, tmp_path):
    """A --read-prompt run starts from a file without prompt projections (them at zero, the rest as saved); a file
    with them is not continued without the flag, and a run resumes only with the choice it started with."""
    plain = trainer.host.new_adapter()
    generator = torch.Generator().manual_seed(4)
    for p in plain.parameters():
        p.data = torch.randn(p.shape, generator=generator) * 0.1
    save_adapter(tmp_path / "plain.safetensors", plain)
    reading = AdapterTrainer(SHIPPED_BASE, Accelerator(cpu=True), dataclasses.replace(SMALL, reads_prompt=True))
    reading.init_from(tmp_path / "plain.safetensors")
    for key, value in reading.adapter.state_dict().items():
        expected = torch.zeros_like(value) if "_prompt." in key else plain.state_dict()[key]
        assert torch.equal(value, expected), key
    reading.export(tmp_path / "reading.safetensors", overwrite=False)
    assert load_adapter(tmp_path / "reading.safetensors").metadata.format_version == 2
    with pytest.raises(ValueError, match="reads the prompt; pass --read-prompt"):
        trainer.init_from(tmp_path / "reading.safetensors")
    reading.save(tmp_path, step=1)
    with pytest.raises(ValueError, match="holds a run with --read-prompt; resume with it"):
        trainer.load(tmp_path)


def test_shipped_adapter_denoises_held_out_subjects_better_than_none(trainer):
    """On validation subjects' targets at high noise (where the subject's colours are decided) the shipped adapter,
    reading the demos through the blocks it was trained on, predicts the noise better than the base alone."""
    shipped = load_adapter(ROOT / "models/suti/suti_toy_adapter.safetensors")
    host = DiffusersSuTIHost(trainer.host.unet, trainer.alphas,
                             feature_source=feature_source_of(shipped.metadata.block_map))
    sampler = SubjectDemoSampler(3, 128, p_edit=0.3, rng=np.random.default_rng(99), split="val")
    batch = sampler.batch(16)
    demo_latents, demo_text = trainer._encode(batch.demo_images, batch.demo_captions)
    latents, text = trainer._encode(batch.target_images, batch.target_captions)
    neighbors = host.encode_demos(demo_latents, demo_text.context, 3)
    assert neighbors.masks is None
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    for t in (700, 900):
        noisy = noised(latents, noise, trainer.alphas[t])
        losses = {}
        for name, adapter in (("none", host.new_adapter()), ("shipped", shipped)):
            with torch.no_grad(), host.neighbor_attention(adapter, neighbors):
                losses[name] = float(((host.unet(noisy, torch.full((16,), t), text.context).sample - noise) ** 2).mean())
        assert losses["shipped"] < 0.95 * losses["none"], (t, losses)


def test_recipe_warms_up_then_decays_and_draws_high_noise_timesteps(trainer):
    recipe = AdapterRecipe(lr=1e-3, warmup=10, steps=110, final_lr_fraction=0.1)
    assert recipe.lr_at(0) == pytest.approx(1e-4) and recipe.lr_at(9) == pytest.approx(1e-3)
    assert recipe.lr_at(60) == pytest.approx(0.55e-3) and recipe.lr_at(110) == pytest.approx(1e-4)
    trainer.noise.manual_seed(0)
    t = trainer._timesteps(20000).float()
    assert 0.62 < t.mean() / 1000 < 0.71, "density rising linearly in t: mean 2/3"
    assert (t < 100).float().mean() < 0.02 and t.max() <= 999


@pytest.mark.parametrize("density, mean, below_300", [("uniform", 1 / 2, 0.30), ("low-noise", 1 / 3, 0.51)])
def test_timestep_densities_put_their_weight_where_they_say(trainer, density, mean, below_300):
    trainer.recipe, kept = AdapterRecipe(timesteps=density), trainer.recipe
    try:
        trainer.noise.manual_seed(0)
        t = trainer._timesteps(20000).float()
    finally:
        trainer.recipe = kept
    assert abs(t.mean() / 1000 - mean) < 0.01 and abs((t < 300).float().mean() - below_300) < 0.015
    assert t.min() >= 0 and t.max() <= 999


def test_an_unknown_timestep_density_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="uniform, high-noise, low-noise"):
        AdapterTrainer(Path("unused"), None, AdapterRecipe(timesteps="late"))


def test_subject_weight_makes_the_subjects_error_count_that_many_times_the_backgrounds():
    weighted = AdapterTrainer.__new__(AdapterTrainer)
    weighted.recipe = AdapterRecipe(subject_weight=4.0)
    pred, noise = torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[:, :64, :64] = True  # the subject covers the top-left quarter of the latent grid
    pred[0, :, 0, 0] = 1.0     # example 0: error in one subject cell
    pred[1, :, 15, 15] = 1.0   # example 1: the same error in one background cell
    per_example = [float(weighted._weighted_mse(pred[i:i + 1], noise[i:i + 1], masks[i:i + 1])) for i in (0, 1)]
    assert per_example[0] == pytest.approx(4 * per_example[1])
    everywhere = torch.ones_like(pred)
    assert float(weighted._weighted_mse(everywhere, noise, masks)) == pytest.approx(1.0), "weights average to 1"
    weighted.recipe = AdapterRecipe()
    assert float(weighted._weighted_mse(pred, noise, masks)) == pytest.approx(float(torch.nn.functional.mse_loss(pred, noise)))


def test_examples_carry_the_targets_exact_subject_mask():
    batch = SubjectDemoSampler(2, 128, p_edit=0.3, rng=np.random.default_rng(3)).batch(3)
    assert batch.target_masks.shape == (3, 128, 128) and batch.target_masks.dtype == torch.bool
    assert all(0 < float(m.float().mean()) < 0.6 for m in batch.target_masks)
