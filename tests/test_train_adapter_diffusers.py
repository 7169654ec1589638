"""The adapter trainer on diffusers SD1.x / SDXL bases (tiny random folders as tests/test_dreambooth.py makes them)
reading shards at the base's image size: a few steps train the adapter, `--resume` continues exactly, the export
carries the base's block layout (the one ComfyUI's SuTI nodes see on that checkpoint), and rendered examples are
refused with the fix."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import comfy_helpers as ch
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from test_dreambooth import tiny_diffusers_folder

from suti_core.adapter import load_adapter
from training import train_adapter
from training.train_adapter import AdapterRecipe, AdapterTrainer, SubjectDemoSampler
from training.write_shards import write_renderer_shards

ARCHITECTURE = {"sd15": "sd1", "sdxl": "sdxl"}  # tiny folder layout -> the adapter's architecture
SIZE = 64  # the tiny folders' image size: UNet sample_size 8 × the VAE's 8
STEPS = ["--demos", "2", "--batch-size", "2", "--lr", "1e-3", "--warmup", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_renderer_shards(SubjectDemoSampler(2, SIZE, 0.3, np.random.default_rng(0)), out, 4, 2, seed=7)
    return out


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(arch, tmp_path_factory) -> Path:
    return tiny_diffusers_folder(tmp_path_factory.mktemp("base"), arch)


def _train(folder: Path, shards: Path, run_dir: Path, steps: int, *extra: str) -> dict:
    """`python -m training.train_adapter` in this process; returns its saved state."""
    train_adapter.main(["--base", str(folder), "--shards", str(shards), "--run-dir", str(run_dir),
                        "--steps", str(steps), *STEPS, *extra])
    return torch.load(run_dir / "adapter_state.pt", weights_only=False)


@pytest.fixture(scope="module")
def unbroken(folder, shards, tmp_path_factory) -> tuple[dict, Path]:
    """Two unbroken steps: the saved state and the run folder (with latest.safetensors and log.jsonl)."""
    run = tmp_path_factory.mktemp("unbroken")
    return _train(folder, shards, run, 2), run


def test_a_few_steps_train_the_adapter_and_log_no_validation(unbroken):
    state, run = unbroken
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["step"] == 2
    assert not any(k.startswith("val_ratio") for r in records for k in r), "validation is toy-world only"
    outputs = {k: v for k, v in state["adapter"].items() if k.endswith("to_out.weight")}
    unmoved = [k for k, v in outputs.items() if not v.abs().sum() > 0]
    assert outputs and not unmoved, f"zero-initialised outputs that did not train: {unmoved[:3]}"


def test_export_records_the_bases_architecture_and_transformer_blocks(unbroken, folder, arch):
    adapter = load_adapter(unbroken[1] / "latest.safetensors")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    assert adapter.metadata.architecture == ARCHITECTURE[arch]
    assert adapter.metadata.context_dim == unet.config.cross_attention_dim
    assert len(adapter.metadata.blocks) == blocks, "one adapter block per transformer block of the base"


def test_export_loads_onto_the_same_checkpoint_in_comfyui(unbroken, arch, suti_pack):
    layout = importlib.import_module(f"{suti_pack.__name__}.nodes.layout")
    pack_adapter = importlib.import_module(f"{suti_pack.__name__}.suti_core.adapter")
    adapter = pack_adapter.load_adapter(unbroken[1] / "latest.safetensors")
    model = layout.describe_model(ch.make_tiny_unet(arch))
    layout.check_adapter_for_model(adapter, model)  # raises AdapterMismatchError naming the difference
    assert adapter.metadata.block_map == model.block_map


def test_resume_after_one_step_continues_as_the_unbroken_run(unbroken, folder, shards, tmp_path):
    _train(folder, shards, tmp_path, 1)
    resumed = _train(folder, shards, tmp_path, 2, "--resume")
    expected = unbroken[0]
    assert resumed["step"] == expected["step"] == 2
    for part in ("adapter", "ema"):
        for key, value in expected[part].items():
            assert torch.equal(resumed[part][key], value), f"{part} {key} differs after resuming"
    for index, moments in expected["opt"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(resumed["opt"]["state"][index][name], value), f"optimiser {name} of parameter {index}"


def test_a_diffusers_base_without_shards_names_the_fix(folder):
    with pytest.raises(ValueError, match=r"renderer draws only the toy world.*pass --shards DIR with examples at 64px"):
        AdapterTrainer(folder, Accelerator(cpu=True), AdapterRecipe(batch_size=1, n_demos=2))
