"""The DreamBooth expert: it learns (LoRA, full, textual inversion), LoRA mode trains only the LoRA and the
identifier row, textual inversion only the identifier row,
the identifier carries the subject, the export loads with ComfyUI's stock LoraLoader (toy base as the pack
loads it; SD1.5 and SDXL layouts) with every key mapped, and the CLI never overwrites by accident."""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
from pathlib import Path

import comfy_helpers as ch
import pytest
import torch
from safetensors import safe_open

from suti_core.toy.spec import ToyBaseSpec
from suti_core.world import VOCABULARY
from training import dreambooth
from training.dreambooth import DreamBoothRecipe, DreamBoothTrainer, subject_demos
from training.expert_base import load_expert_base
from training.expert_prior import PriorSettings, ddim_sample
from training.toy_base import ToyBaseTrainer

TINY = dataclasses.replace(ToyBaseSpec(), image_size=64, unet_channels=(32, 32, 32), context_dim=32, ae_widths=(16, 16))
FAST_PRIOR = PriorSettings(count=4, steps=2)
SUBJECT = 4653  # a held-out striped dog


def fast_recipe(**changes) -> DreamBoothRecipe:
    return DreamBoothRecipe(**{"steps": 12, "lr": 3e-3, "identifier_lr": 3e-2, "prior": FAST_PRIOR, **changes})


@pytest.fixture(scope="module")
def toy_base_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("toy_base")
    ToyBaseTrainer(TINY, run, batch_size=2, seed=0, ae_batch_size=2).export(run / "toy.safetensors")
    return run / "toy.safetensors"


def make_trainer(base_file: Path, tmp_path: Path, **changes) -> DreamBoothTrainer:
    recipe = fast_recipe(**changes)
    base = load_expert_base(base_file, recipe.identifier)
    return DreamBoothTrainer(base, subject_demos(base, SUBJECT, 3, recipe.identifier), recipe, tmp_path / "prior")


def fixed_loss(trainer: DreamBoothTrainer) -> float:
    with torch.no_grad():
        return trainer.loss(torch.Generator().manual_seed(123)).item()


# The tiny base is barely trained, so its text steers the UNet only a little: one token row (textual inversion)
# can lower the loss by about 0.1 % there (1.1035 -> 1.1024), where the UNet modes lower it by over 10 %.
@pytest.mark.parametrize("mode, lr, steps, max_ratio", [
    ("lora", 1e-2, 30, 0.9), ("full", 1e-3, 12, 0.9), ("textual-inversion", 2e-1, 30, 0.9995)])
def test_expert_loss_falls_on_a_tiny_base(toy_base_file, tmp_path, mode, lr, steps, max_ratio):
    trainer = make_trainer(toy_base_file, tmp_path, mode=mode, lr=lr, steps=steps)
    before = fixed_loss(trainer)
    assert trainer.train() == steps
    after = fixed_loss(trainer)
    assert after < max_ratio * before, f"{mode} expert did not learn: loss {before:.5f} -> {after:.5f}"


def test_lora_mode_trains_only_the_lora_and_the_identifier_row(toy_base_file, tmp_path):
    trainer = make_trainer(toy_base_file, tmp_path, steps=3)
    unet, text = trainer.base.unet, trainer.base.text
    frozen = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    table = text.encoder.token_embedding.table.weight.clone()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)[:3]
    trainer.train()
    changed = [k for k, v in unet.state_dict().items() if k in frozen and not torch.equal(v, frozen[k])]
    assert not changed, f"base weights moved in LoRA mode: {changed[:3]}"
    assert torch.equal(text.encoder.token_embedding.table.weight, table), "the token table itself must stay frozen"
    assert text.identifiers[0].delta.abs().sum() > 0, "the identifier row did not learn"


def test_textual_inversion_trains_only_the_identifier_row(toy_base_file, tmp_path):
    trainer = make_trainer(toy_base_file, tmp_path, mode="textual-inversion", lr=5e-2, steps=3)
    unet, embedding = trainer.base.unet, trainer.base.text.identifiers[0]
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    rows = torch.arange(embedding.table.num_embeddings)
    with torch.no_grad():
        rows_before = embedding(rows)
    assert not any(p.requires_grad for p in unet.parameters()) and not any("lora_" in k for k in unet_before)
    assert trainer.prior_latents is None and not (tmp_path / "prior").exists(), "textual inversion drew class images"
    trainer.train()
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, unet_before[k])]
    assert not changed, f"UNet weights moved in textual-inversion mode: {changed[:3]}"
    with torch.no_grad():
        moved = (embedding(rows) != rows_before).any(dim=-1).nonzero().flatten().tolist()
    assert moved == [embedding.token_id], f"token rows {moved[:5]} moved; only the identifier row {embedding.token_id} may"


def test_identifier_caption_carries_the_subject_after_training(toy_base_file, tmp_path):
    trainer = make_trainer(toy_base_file, tmp_path, steps=30)
    demos = trainer.demos
    class_captions = [c.replace("sks ", "") for c in demos.captions]
    assert class_captions != demos.captions

    def demo_loss(captions: list[str]) -> float:
        generator = torch.Generator().manual_seed(7)
        latents = demos.latents.repeat(4, 1, 1, 1)
        t = torch.randint(0, 1000, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        a = trainer.base.alphas_cumprod[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            pred = trainer.base.predict_noise(a.sqrt() * latents + (1 - a).sqrt() * noise, t, trainer.base.text(captions * 4))
        return float(((pred - noise) ** 2).mean())

    trainer.train()
    with_id, without = demo_loss(demos.captions), demo_loss(class_captions)
    assert with_id < without, f"the identifier caption fits the subject no better than the class caption ({with_id:.4f} vs {without:.4f})"


def test_class_images_are_cached_per_class(toy_base_file, tmp_path):
    first = make_trainer(toy_base_file, tmp_path, steps=0)
    second = make_trainer(toy_base_file, tmp_path, steps=0)
    assert first.prior_seconds > 0 and second.prior_seconds == 0, "the second expert of a class redrew its class images"
    assert torch.equal(first.prior_latents, second.prior_latents)
    assert len(list((tmp_path / "prior").glob("dog-*.safetensors"))) == 1


def test_every_tensor_the_models_see_is_on_the_bases_device(toy_base_file, tmp_path):
    # "meta" refuses a CPU operand as cuda does: a tensor left on the CPU raises here, without a GPU
    make_trainer(toy_base_file, tmp_path, steps=0)  # the class images the meta expert reads from the cache
    recipe = fast_recipe()
    base = load_expert_base(toy_base_file, recipe.identifier, device="meta")
    trainer = DreamBoothTrainer(base, subject_demos(base, SUBJECT, 3, recipe.identifier), recipe, tmp_path / "prior")
    models = [*base.unet.parameters(), *base.text.encoder.parameters(), base.alphas_cumprod, trainer.prior_latents]
    assert {t.device.type for t in models} == {"meta"}, "a model part (LoRA and identifier row included) or the " \
                                                        "class prior stayed on the CPU"
    assert trainer.loss().device.type == "meta"
    latents = ddim_sample(base, base.text(["a photo of a sks dog"]), base.text([""]), FAST_PRIOR)
    assert base.decode_latents(latents).device.type == "meta"


def test_cli_refuses_to_overwrite_an_existing_expert(toy_base_file, tmp_path, capsys):
    out = tmp_path / "expert.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        dreambooth.main(["--base", str(toy_base_file), "--subject", str(SUBJECT), "--steps", "1", "--out", str(out)])
    assert exit_info.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_cli_writes_the_expert_with_its_metadata_and_report(toy_base_file, tmp_path, capsys):
    out = tmp_path / "expert.safetensors"
    out.write_bytes(b"old")
    dreambooth.main(["--base", str(toy_base_file), "--subject", str(SUBJECT), "--steps", "2", "--out", str(out),
                     "--overwrite", "--prior-cache", str(tmp_path / "prior"), "--rank", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"subject {SUBJECT}: lora expert, 2 steps,") and f"{out.stat().st_size:,} bytes" in line
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("subject", "identifier", "class_word", "steps", "mode", "rank")} == {
        "subject": str(SUBJECT), "identifier": "sks", "class_word": "dog", "steps": "2", "mode": "lora", "rank": "2"}
    assert json.loads(meta["base"]) == {"architecture": "toy", "name": "toy.safetensors"}


def test_identifier_must_be_one_token_and_not_the_class_word(toy_base_file):
    with pytest.raises(ValueError, match="is 2 tokens"):
        load_expert_base(toy_base_file, "sks zwx")
    base = load_expert_base(toy_base_file, "dog")
    with pytest.raises(ValueError, match="must differ from the class word"):
        subject_demos(base, SUBJECT, 3, "dog")


# ---------------------------------------------------------------- ComfyUI's stock LoraLoader


@pytest.fixture
def loras_dir(comfyui, tmp_path, monkeypatch):
    """ComfyUI's `loras` folder pointed at a temp dir for one test."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("loras", None)
    yield tmp_path
    folder_paths.filename_list_cache.pop("loras", None)


def lora_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]


def test_exported_lora_loads_with_stock_loraloader_onto_the_toy_base(toy_base_file, tmp_path, loras_dir, suti_pack, caplog):
    import nodes

    toy_nodes = importlib.import_module(f"{suti_pack.__name__}.nodes.toy_base")
    trainer = make_trainer(toy_base_file, tmp_path, steps=2)
    trainer.train()
    with torch.no_grad():  # make every LoRA weight and the identifier row show in the outputs
        for name, p in trainer.base.unet.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn_like(p) * 0.05)
        trainer.base.text.identifiers[0].delta.add_(1.0)
    trainer.save(loras_dir / "expert.safetensors")

    model, clip, _ = toy_nodes.load_toy_base(toy_base_file)
    with caplog.at_level(logging.WARNING):
        lora_model, lora_clip = nodes.LoraLoader().load_lora(model, clip, "expert.safetensors", 1.0, 1.0)
    assert not lora_warnings(caplog), lora_warnings(caplog)[:3]
    with safe_open(str(loras_dir / "expert.safetensors"), "pt") as f:
        unet_modules = {k.rsplit(".", 2)[0] for k in f.keys() if k.startswith("lora_unet_")}
    assert len(lora_model.patches) == len(unet_modules) and len(lora_clip.patcher.patches) == 1

    caption = "a photo of a sks dog on the beach"
    base_text, lora_text = (c.encode_from_tokens(c.tokenize(caption)) for c in (clip, lora_clip))
    with torch.no_grad():
        expected_text = trainer.base.text([caption]).context
    assert not torch.allclose(base_text, lora_text), "strength_clip did not apply the identifier row"
    torch.testing.assert_close(lora_text, expected_text, atol=2e-3, rtol=2e-3)

    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        expected = trainer.base.unet(x, t, encoder_hidden_states=expected_text.repeat(2, 1, 1)).sample
        base_out = model.model.diffusion_model(x, t.float(), context=expected_text.repeat(2, 1, 1))
        lora_model.patch_model()
        try:
            got = lora_model.model.diffusion_model(x, t.float(), context=expected_text.repeat(2, 1, 1))
        finally:
            lora_model.unpatch_model()
    assert not torch.allclose(got, base_out, atol=1e-4), "the LoRA did not change the model's output"
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------- diffusers SD1.x / SDXL checkpoint folders

# ComfyUI's tiny SD1.5 / SDXL layouts (tests/comfy_helpers.py TINY_DIMS) as diffusers UNet configs.
TINY_DIFFUSERS_UNETS = {
    "sd15": {"block_out_channels": (32, 64, 128, 128), "cross_attention_dim": 32, "attention_head_dim": 2,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3},
    "sdxl": {"block_out_channels": (32, 64, 128), "cross_attention_dim": 64, "attention_head_dim": (2, 4, 8),
             "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},  # 1280 pooled + 6 size ids x 256
}
CLIP_WIDTH = 32  # SDXL: two encoders, contexts concatenated to 64; pooled projection 1280 as SDXL's
CLIP_VOCAB = 49408  # ComfyUI builds CLIP with the real vocabulary size; the tiny tokenizer uses its first ids


def tiny_clip_tokenizer(folder: Path, words: list[str]):
    """A CLIP BPE tokenizer whose vocabulary spells exactly `words` (each reachable by chained merges)."""
    from transformers import CLIPTokenizer

    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        while len(pieces) > 1:
            merges += [f"{pieces[0]} {pieces[1]}"] if f"{pieces[0]} {pieces[1]}" not in merges else []
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_diffusers_folder(root: Path, arch: str) -> Path:
    """A random diffusers checkpoint folder of `arch`'s layout: unet, vae, text encoder(s), tokenizer(s), scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    folder = root / arch
    UNet2DConditionModel(sample_size=8, layers_per_block=2, **TINY_DIFFUSERS_UNETS[arch]).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4).save_pretrained(folder / "vae")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    names = ("", "_2") if arch == "sdxl" else ("",)
    for i, name in enumerate(names):
        tokenizer = tiny_clip_tokenizer(root / f"vocab_{arch}{name}", list(VOCABULARY) + ["sks"])
        tokenizer.save_pretrained(folder / f"tokenizer{name}")
        config = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=CLIP_WIDTH, intermediate_size=64,
                                num_hidden_layers=3, num_attention_heads=2, projection_dim=1280,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1)
        (CLIPTextModelWithProjection if i else CLIPTextModel)(config).save_pretrained(folder / f"text_encoder{name}")
    return folder


def comfy_tiny_clip(arch: str):
    """ComfyUI's own SD1 / SDXL CLIP module at tiny width (uninitialised: only its names and shapes matter)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip

    tiny = {"hidden_size": CLIP_WIDTH, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
    if arch == "sd15":
        return comfy.sd1_clip.SD1ClipModel(model_options={"clip_l_model_config": tiny})
    return comfy.sdxl_clip.SDXLClipModel(model_options={"clip_l_model_config": tiny, "clip_g_model_config": tiny})


def test_textual_inversion_export_loads_with_stock_loraloader_as_a_clip_patch(toy_base_file, tmp_path, loras_dir,
                                                                                suti_pack, caplog):
    import nodes

    toy_nodes = importlib.import_module(f"{suti_pack.__name__}.nodes.toy_base")
    trainer = make_trainer(toy_base_file, tmp_path, mode="textual-inversion", lr=5e-2, steps=2)
    trainer.train()
    path = loras_dir / "ti.safetensors"
    assert trainer.save(path) == path.stat().st_size
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("text_encoders.") for k in f.keys()), sorted(f.keys())[:3]
        assert f.metadata()["mode"] == "textual-inversion" and "rank" not in f.metadata()

    model, clip, _ = toy_nodes.load_toy_base(toy_base_file)
    with caplog.at_level(logging.WARNING):
        ti_model, ti_clip = nodes.LoraLoader().load_lora(model, clip, "ti.safetensors", 0.0, 1.0)
    assert not lora_warnings(caplog), lora_warnings(caplog)[:3]
    assert not ti_model.patches and len(ti_clip.patcher.patches) == 1

    def encodings(caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(c.encode_from_tokens(c.tokenize(caption)) for c in (clip, ti_clip))

    base_text, ti_text = encodings("a photo of a sks dog on the beach")
    assert not torch.allclose(base_text, ti_text), "strength_clip did not apply the identifier row"
    with torch.no_grad():
        torch.testing.assert_close(ti_text, trainer.base.text(["a photo of a sks dog on the beach"]).context,
                                   atol=2e-3, rtol=2e-3)
    base_plain, ti_plain = encodings("a photo of a dog on the beach")
    assert torch.equal(base_plain, ti_plain), "the identifier patch changed a caption without the identifier"


@pytest.mark.parametrize("gpus, device", [(2, "cuda"), (0, "cpu")])
def test_cli_device_defaults_to_cuda_when_torch_sees_one(monkeypatch, gpus, device):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    args = dreambooth.build_parser().parse_args(["--base", "b", "--subject", "1", "--out", "o"])
    assert args.device == device
    assert dreambooth.build_parser().parse_args(["--base", "b", "--subject", "1", "--out", "o",
                                                 "--device", "cpu"]).device == "cpu"


def test_cli_mode_flag_with_full_as_its_alias(capsys):
    required = ["--base", "b", "--subject", "1", "--out", "o"]
    modes = [dreambooth.build_parser().parse_args(required + extra).mode
             for extra in ([], ["--full"], ["--mode", "full"], ["--mode", "textual-inversion"])]
    assert modes == ["lora", "full", "full", "textual-inversion"]
    with pytest.raises(SystemExit):
        dreambooth.build_parser().parse_args(required + ["--mode", "dreambooth"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not one of lora, full, textual-inversion"):
        DreamBoothRecipe(mode="ti")


@pytest.mark.parametrize("arch, full", [
    pytest.param("sd15", False, id="sd15-lora"),
    pytest.param("sdxl", False, id="sdxl-lora", marks=pytest.mark.slow),  # 70 transformer blocks
    pytest.param("sdxl", True, id="sdxl-full", marks=pytest.mark.slow),
])
def test_diffusers_folder_expert_trains_and_every_key_maps_in_comfyui(arch, full, tmp_path, comfyui, caplog):
    import comfy.lora
    import comfy.utils

    recipe = fast_recipe(steps=2, mode="full" if full else "lora", lr=1e-3)
    base = load_expert_base(tiny_diffusers_folder(tmp_path, arch), recipe.identifier)
    assert base.architecture == {"sd15": "sd1", "sdxl": "sdxl"}[arch] and base.image_size == 64
    trainer = DreamBoothTrainer(base, subject_demos(base, SUBJECT, 3, recipe.identifier), recipe, tmp_path / "prior")
    before = [p.clone() for p in trainer.opt.param_groups[0]["params"]]
    assert trainer.train() == 2 and math.isfinite(fixed_loss(trainer))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.opt.param_groups[0]["params"]))
    assert all(e.delta.abs().sum() > 0 for e in base.text.identifiers), "a CLIP identifier row did not learn"
    path = tmp_path / "expert.safetensors"
    trainer.save(path)

    model = ch.make_tiny_unet(arch)
    clip = comfy_tiny_clip(arch)
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model.model, {}))
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.utils.load_torch_file(str(path), safe_load=True), key_map)
    assert not lora_warnings(caplog), lora_warnings(caplog)[:3]
    unet_patches = {k for k in patches if k.startswith("diffusion_model.")}
    assert model.add_patches({k: patches[k] for k in unet_patches}, 1.0) and len(model.patches) == len(unet_patches)
    model.patch_model()  # shapes must fit ComfyUI's own layout
    model.unpatch_model()
    clip_state = clip.state_dict()
    for key in set(patches) - unet_patches:
        assert clip_state[key].shape == (CLIP_VOCAB, CLIP_WIDTH), key
    assert len(set(patches) - unet_patches) == len(base.text.identifiers)
