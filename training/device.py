"""The training commands' default device, one rule for all of them."""
from __future__ import annotations

import torch


def default_device() -> str:
    """The GPU when torch sees one. Counted through NVML, which (unlike `torch.cuda.is_available`) leaves the
    parent free to fork local workers that use CUDA."""
    return "cuda" if torch.cuda.device_count() > 0 else "cpu"
