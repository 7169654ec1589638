"""A small f=8 autoencoder (TAESD-like): 128×128×3 images <-> 16×16×4 latents."""
from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _encoder(widths: tuple[int, ...], latent_channels: int, stem: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.PixelUnshuffle(stem), nn.Conv2d(3 * stem**2, widths[0], 3, padding=1), ResBlock(widths[0])]
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(w_in, w_out, 3, stride=2, padding=1), ResBlock(w_out)]
    layers += [nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], latent_channels, 3, padding=1)]
    return nn.Sequential(*layers)


def _decoder(widths: tuple[int, ...], latent_channels: int, stem: int, depth: int) -> nn.Sequential:
    rev = widths[::-1]
    layers: list[nn.Module] = [nn.Conv2d(latent_channels, rev[0], 3, padding=1), *[ResBlock(rev[0]) for _ in range(depth)]]
    for w_in, w_out in zip(rev, rev[1:]):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w_in, w_out, 3, padding=1),
                   *[ResBlock(w_out) for _ in range(depth)]]
    layers += [nn.GroupNorm(8, rev[-1]), nn.SiLU(), nn.Conv2d(rev[-1], 3 * stem**2, 3, padding=1), nn.PixelShuffle(stem)]
    return nn.Sequential(*layers)


class ToyAutoencoder(nn.Module):
    """Pixel-unshuffle stem (lossless, cheap) + stride-2 stages: f = stem * 2**(len(widths)-1) = 8.

    Images in [-1, 1]; latents unscaled (the base model's latent format holds the scale factor).
    """

    def __init__(self, widths: tuple[int, ...] = (64, 96), latent_channels: int = 4, stem: int = 4, decoder_depth: int = 1):
        super().__init__()
        self.encoder = _encoder(tuple(widths), latent_channels, stem)
        self.decoder = _decoder(tuple(widths), latent_channels, stem, decoder_depth)
        self.latent_channels = latent_channels
        self.downscale = stem * 2 ** (len(widths) - 1)

    @classmethod
    def from_spec(cls, spec) -> "ToyAutoencoder":
        """The autoencoder a ToyBaseSpec describes."""
        return cls(spec.ae_widths, spec.latent_channels, spec.ae_stem, spec.ae_decoder_depth)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/8, W/8)."""
        if images.shape[-1] % self.downscale or images.shape[-2] % self.downscale:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.downscale}")
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(latents)
