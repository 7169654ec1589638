"""The frozen base a per-subject expert fine-tunes and the SuTI adapter trains on (training/train_adapter.py): the
toy base file or a diffusers SD1.x / SDXL folder, behind one interface (UNet, text conditioning, image -> latent,
noise schedule) on one torch device.

The base is the one place the device lives: its models and schedule sit there, and whoever trains, samples or
renders with it puts the tensors it makes on `base.device` (noise drawn on the CPU, so every device draws alike)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from suti_core.toy.checkpoint import read_toy_base

from .expert_text import ClipText, Conditioning, ToyText
from .toy_base import ddpm_alphas_cumprod
from .toy_controlnet import load_base_unet


@dataclass
class ExpertBase:
    """A frozen base model; `source` names the file or folder it came from (for metadata and caches)."""

    architecture: str                                  # "toy", "sd1" or "sdxl"
    source: Path
    unet: UNet2DConditionModel
    text: ToyText | ClipText
    encode_images: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) in [-1, 1], any device -> scaled latents
    alphas_cumprod: torch.Tensor                       # (1000,)
    image_size: int
    decode_latents: Callable[[torch.Tensor], torch.Tensor]  # scaled latents -> (B, 3, S, S) in [-1, 1]: expert renders
    device: torch.device                               # where the models, the schedule and every input they see live

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's epsilon prediction for `cond` (SDXL's added conditioning included)."""
        return self.unet(noisy, t, encoder_hidden_states=cond.context, added_cond_kwargs=cond.added).sample


def load_toy(path: Path, identifier: str | None, device: torch.device) -> ExpertBase:
    """The embedded default: diffusers UNet of the toy base file, its word-level encoder and autoencoder."""
    ckpt = read_toy_base(path)
    ae = ckpt.autoencoder().to(device)
    return ExpertBase("toy", path, load_base_unet(ckpt).to(device), ToyText(ckpt, identifier, device),
                      lambda images: ae.encode(images.to(device)) * ckpt.latent_scale, ddpm_alphas_cumprod().to(device),
                      ckpt.spec.image_size, lambda latents: ae.decode(latents / ckpt.latent_scale).clamp(-1, 1), device)


def load_diffusers(folder: Path, identifier: str | None, device: torch.device) -> ExpertBase:
    """A diffusers SD1.x / SDXL checkpoint folder (unet/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{folder} predicts {scheduler.config.prediction_type!r}; SuTI's trainers support "
                         "epsilon-prediction bases (SD1.x, SDXL base)")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False).to(device)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval().requires_grad_(False).to(device)
    image_size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    sdxl = unet.config.addition_embed_type == "text_time"
    return ExpertBase("sdxl" if sdxl else "sd1", folder, unet, ClipText(folder, identifier, sdxl, image_size, device),
                      lambda images: vae.encode(images.to(device)).latent_dist.mean * vae.config.scaling_factor,
                      scheduler.alphas_cumprod.float().to(device), image_size,
                      lambda latents: vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1), device)


def load_expert_base(path: Path, identifier: str | None, device: torch.device | str = "cpu") -> ExpertBase:
    """A toy base .safetensors file or a diffusers checkpoint folder on `device`, its text with the learnable
    `identifier` row (None: none, plain captions); errors say which was expected."""
    device = torch.device(device)
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"{path} is a folder without unet/: pass a diffusers SD1.x / SDXL checkpoint "
                                    "folder or the toy base file models/toy/suti_toy_base.safetensors")
        return load_diffusers(path, identifier, device)
    return load_toy(path, identifier, device)
