"""Class-prior images for DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. 2), drawn by the frozen
base itself from captions that name only the class, and cached per (base, class, settings): every expert of
a class reuses them, so their cost is not a per-subject cost."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from suti_core.world import caption_for, sample_context

from .expert_base import ExpertBase
from .expert_text import Conditioning


@dataclass(frozen=True)
class PriorSettings:
    """How many class images, and how cheaply they are drawn (deterministic DDIM, classifier-free guidance)."""

    count: int = 24
    steps: int = 10
    cfg: float = 4.0
    seed: int = 0


def class_captions(class_word: str, count: int, seed: int) -> list[str]:
    """`count` world captions of the bare class word in contexts drawn with the world's edit mix."""
    rng = np.random.default_rng(seed)
    return [caption_for(class_word, sample_context(rng), i) for i in range(count)]


@torch.no_grad()
def ddim_sample(base: ExpertBase, cond: Conditioning, uncond: Conditioning, settings: PriorSettings) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eta = 0) with CFG; returns latents (B, C, h, w) on the base's device.
    The start noise is drawn on the CPU, so every device starts from the same."""
    generator = torch.Generator().manual_seed(settings.seed)
    channels, side = base.unet.config.in_channels, base.unet.config.sample_size
    x = torch.randn(len(cond.context), channels, side, side, generator=generator).to(base.device)
    both = Conditioning.cat([uncond, cond])
    timesteps = torch.linspace(len(base.alphas_cumprod) - 1, 0, settings.steps).round().long()  # on the CPU: it indexes the schedule
    for i, t in enumerate(timesteps):
        eps_u, eps_c = base.predict_noise(torch.cat([x, x]), t.repeat(2 * len(x)).to(base.device), both).chunk(2)
        eps = eps_u + settings.cfg * (eps_c - eps_u)
        a_t = base.alphas_cumprod[t]
        a_prev = base.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else a_t.new_tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def _cache_path(cache_dir: Path, base: ExpertBase, class_word: str, settings: PriorSettings) -> Path:
    weights = base.source / "unet" if base.source.is_dir() else base.source
    key = json.dumps({"base": str(base.source.resolve()), "mtime": weights.stat().st_mtime_ns, "class": class_word,
                      **asdict(settings)}, sort_keys=True)
    return cache_dir / f"{class_word}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def class_prior(base: ExpertBase, class_word: str, settings: PriorSettings,
                cache_dir: Path) -> tuple[torch.Tensor, list[str], bool]:
    """(latents (N, C, h, w) on the base's device, their captions, whether they came from the cache)."""
    captions = class_captions(class_word, settings.count, settings.seed)
    path = _cache_path(cache_dir, base, class_word, settings)
    if path.is_file():
        return load_file(str(path))["latents"].to(base.device), captions, True
    with torch.no_grad():
        latents = ddim_sample(base, base.text(captions), base.text([""] * len(captions)), settings)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.cpu().contiguous()}, str(path), metadata={"captions": json.dumps(captions)})
    return latents, captions, False
