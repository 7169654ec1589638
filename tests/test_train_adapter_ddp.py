"""The adapter trainer on several processes: one step of 2 CPU processes (gloo) × batch 1 makes the adapter update
that 1 process × batch 2 makes, through the real command line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suti_core.adapter import load_adapter

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_ADAPTER = ROOT / "models/suti/suti_toy_adapter.safetensors"
# One step from the shipped (non-zero) adapter, so every block's gradient is non-trivial; warm-up 1: full lr.
# AdamW's first step moves each weight by lr * g / (|g| + 1e-8): about lr, except where |g| is near 1e-8, where the
# float rounding of batch 2 against 2 × batch 1 (~1e-6 of g) shows as up to ~0.5% of lr. A small lr keeps that
# under 1e-6 while a wrong example or a wrong average still moves weights by ~lr = 50 times the tolerance.
LR = 5e-5
STEP = ["--steps", "1", "--demos", "2", "--threads", "1", "--lr", str(LR), "--warmup", "1", "--seed", "3",
        "--init-from", str(SHIPPED_ADAPTER), "--demo-features", "encoder+decoder"]


def _train(run_dir: Path, processes: int, batch_size: int) -> dict:
    """One step of `python -m training.train_adapter` on `processes` CPU processes; returns its saved state."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [
        "-m", "training.train_adapter", "--run-dir", str(run_dir), "--batch-size", str(batch_size), *STEP]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # gloo on CPU, even beside a GPU
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, f"{processes} process(es) failed:\n{result.stderr[-4000:]}"
    return torch.load(run_dir / "adapter_state.pt", weights_only=False)


@pytest.mark.slow
def test_two_processes_of_batch_one_step_as_one_process_of_batch_two(tmp_path):
    two, one = _train(tmp_path / "two", 2, 1), _train(tmp_path / "one", 1, 2)
    assert two["step"] == one["step"] == 1
    shipped = load_adapter(SHIPPED_ADAPTER).state_dict()
    for key, after in one["adapter"].items():
        assert not torch.equal(after, shipped[key].to(after)), f"{key} did not move: the step proves nothing about it"
        assert torch.allclose(two["adapter"][key], after, rtol=0, atol=1e-6), (
            f"{key}: 2 processes × batch 1 moved it by up to "
            f"{(two['adapter'][key] - after).abs().max():.2e} from 1 process × batch 2")
    # AdamW's first step is nearly lr * sign(grad): its first moment (0.1 * grad) shows the averaged gradient itself
    for index, state in one["opt"]["state"].items():
        other = two["opt"]["state"][index]
        scale = state["exp_avg"].abs().max()
        assert scale > 0, f"parameter {index} got no gradient: the step says nothing about it"
        assert torch.allclose(other["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-5 * float(scale)), (
            f"parameter {index}: the gradients averaged over 2 processes differ from the batch-2 gradient by up to "
            f"{(other['exp_avg'] - state['exp_avg']).abs().max():.2e} (scale {scale:.2e})")
