"""Region masks (SuTI Apply's `attn_mask`): where in the image one subject's SuTI term acts, per token.

The one rule, for both modes: in a block with an h x w token grid, the SuTI term of latent row b at token t is
multiplied by m_b(t), the mean of the row's mask over the pixels token t covers (an area resize of the mask,
stretched to the image, to h x w; ComfyUI's attention-mask convention, white = apply, as IPAdapter_plus's
`attn_mask`). Adapter mode: x + w_row * m * NA(x). Training-free: out + w_row * m * (augmented - plain), so
each token blends plain self-attention with self-attention over the demo tokens. Complementary masks stay
complementary at every grid (the resize is linear), so chained applies share the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .settings import SharedReadOnly


class RegionMask(SharedReadOnly):
    """A subject's region: masks (1 or P, H, W) in [0, 1], one for every latent row or one per row."""

    def __init__(self, masks: torch.Tensor) -> None:
        self.masks = masks
        self._grids: dict[tuple, torch.Tensor] = {}  # (h, w, device, dtype) -> (1 or P, h*w): a memo, not state

    def token_weights(self, term: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """m_b(t) as (B, N, 1) for a block's term (B, N, C); rows are chunk-major as cond_or_uncond lists them."""
        h, w = extra_options["activations_shape"][-2:]
        chunks = len(extra_options.get("cond_or_uncond") or [0])
        rows = term.shape[0] // chunks  # latent batch
        if h * w != term.shape[1]:
            raise ValueError(f"SuTI attn_mask: block grid {h}x{w} does not match its {term.shape[1]} tokens")
        if self.masks.shape[0] not in (1, rows):
            raise ValueError(
                f"SuTI Apply's attn_mask holds {self.masks.shape[0]} masks but the latent batch has {rows} images: "
                f"give one mask for every image, or one per image (a batch of {rows})"
            )
        grid = self._on_grid(h, w, term.device, term.dtype)  # (1 or P, h*w)
        return grid.expand(rows, -1).repeat(chunks, 1)[..., None]  # (B, N, 1)

    def _on_grid(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (h, w, device, dtype)
        if key not in self._grids:
            resized = F.interpolate(self.masks[:, None], size=(h, w), mode="area")  # (1 or P, 1, h, w)
            self._grids[key] = resized.flatten(1).to(device, dtype)
        return self._grids[key]


def region_mask(attn_mask: torch.Tensor | None) -> RegionMask | None:
    """SuTI Apply's `attn_mask` (MASK (H, W) or (B, H, W)) checked and clamped to [0, 1]; None: everywhere."""
    if attn_mask is None:
        return None
    masks = attn_mask[None] if attn_mask.ndim == 2 else attn_mask
    if masks.ndim != 3 or min(masks.shape) == 0:
        raise ValueError(
            f"attn_mask has shape {tuple(attn_mask.shape)}; connect a MASK (height x width, or a batch of them)"
        )
    masks = masks.detach().float().cpu().clamp(0.0, 1.0)
    empty = [i + 1 for i, mask in enumerate(masks) if not mask.any()]
    if empty:
        raise ValueError(
            f"attn_mask {empty[0]} of {masks.shape[0]} is all black: SuTI would act nowhere in that image; "
            "paint white where this subject goes, or disconnect attn_mask to apply it everywhere"
        )
    return RegionMask(masks)
