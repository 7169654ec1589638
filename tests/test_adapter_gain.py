"""training.adapter_gain: strength 1 of the scaled file acts as strength G of the original, and the tool never
writes over its input or an existing file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from suti_core.adapter import load_adapter
from training.adapter_gain import with_gain

SHIPPED = Path(__file__).resolve().parents[1] / "models/suti/suti_toy_adapter.safetensors"


def test_gain_scales_every_blocks_residual_delta():
    original, scaled = load_adapter(SHIPPED), with_gain(load_adapter(SHIPPED), 1.5)
    torch.manual_seed(0)
    for spec in original.metadata.blocks:
        hidden, neighbors = torch.randn(2, 16, spec.query_dim), torch.randn(1, 24, spec.neighbor_dim)
        block, gained = original.block(spec.key), scaled.block(spec.key)
        expected = 1.5 * block.attend(hidden, block.neighbor_kv(neighbors))
        torch.testing.assert_close(gained.attend(hidden, gained.neighbor_kv(neighbors)), expected, msg=spec.key)


def test_cli_writes_a_new_file_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "scaled.safetensors"
    command = [sys.executable, "-m", "training.adapter_gain", "--gain", "2", str(SHIPPED), str(out)]
    subprocess.run(command, check=True, capture_output=True)
    key = load_adapter(SHIPPED).metadata.blocks[0].key + ".to_out.weight"
    torch.testing.assert_close(load_adapter(out).state_dict()[key], 2 * load_adapter(SHIPPED).state_dict()[key])
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    into_input = subprocess.run([*command[:-1], str(SHIPPED), "--overwrite"], capture_output=True, text=True)
    assert into_input.returncode != 0 and "is the input" in into_input.stderr
