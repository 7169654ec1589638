"""Training-free mode: the demos' features appended to each block's self-attention (no learned weights)."""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import torch

from .layout import key_of
from .settings import SharedReadOnly, SuTISettings


class ReferenceKeysPatch(SharedReadOnly):
    """attn1_patch: append the demo features (the subject's tokens when demos carry masks) to self-attention's
    keys and values."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        key = key_of(extra_options)
        run = self.settings.run(extra_options)
        neighbors = None if run is None else run.features.for_block(key, self.settings.block_map)
        if neighbors is None or neighbors.shape[-1] != context.shape[-1]:
            return n, context, value  # no features at this resolution, or another width (training-free needs equal)
        if self.settings.row_weights(key, n, extra_options) is None:
            return n, context, value
        mask = run.features.mask_for_block(key, self.settings.block_map)
        if mask is not None:
            neighbors = neighbors[:, mask[0]]  # (1, M_subject, C)
        neighbors = neighbors.to(context).expand(context.shape[0], -1, -1)  # (B, M, C)
        return n, torch.cat([context, neighbors], dim=1), torch.cat([value, neighbors], dim=1)


class ReferenceBlendReplace(SharedReadOnly):
    """attn1_replace: plain self-attention blended towards demo-augmented self-attention by strength."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        tokens, heads = q.shape[1], extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        plain = comfy_attention.optimized_attention(
            q, k[:, :tokens], v[:, :tokens], heads, attn_precision=precision, transformer_options=extra_options
        )  # (B, N, H*D)
        if k.shape[1] == tokens:
            return plain  # ReferenceKeysPatch left this block alone
        weights = self.settings.row_weights(key_of(extra_options), q, extra_options)  # (B,)
        augmented = comfy_attention.optimized_attention(
            q, k, v, heads, attn_precision=precision, transformer_options=extra_options
        )
        return plain + weights[:, None, None] * (augmented - plain)
