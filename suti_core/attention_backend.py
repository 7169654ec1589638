"""Multi-head attention for (B, N, H*D) tensors: torch SDPA, or xformers on CUDA when installed."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

_XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None


def attention_backend_name(device: torch.device | str) -> str:
    """Name of the kernel `attention` uses for tensors on `device`."""
    if _XFORMERS_INSTALLED and torch.device(device).type == "cuda":
        return "xformers"
    return "sdpa"


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads)  # (B, N, H, D)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    import xformers.ops

    out = xformers.ops.memory_efficient_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    )  # (B, N, H, D)
    return out.flatten(2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; `mask` (B or 1, M) bool marks the keys that may be attended."""
    if q.shape[-1] % heads != 0:
        raise ValueError(f"query width {q.shape[-1]} is not divisible by heads={heads}")
    if mask is None and attention_backend_name(q.device) == "xformers":
        return _xformers_attention(q, k, v, heads)
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M)
    out = F.scaled_dot_product_attention(
        _split_heads(q, heads).transpose(1, 2),
        _split_heads(k, heads).transpose(1, 2),
        _split_heads(v, heads).transpose(1, 2),
        attn_mask=attn_mask,
    )  # (B, H, N, D)
    return out.transpose(1, 2).flatten(2)  # (B, N, H*D)
