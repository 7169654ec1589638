"""Multi-head attention for (B, N, H*D) tensors: torch SDPA, or xformers on CUDA when installed and allowed.

The host decides whether xformers may run (`set_xformers_enabled` or a per-call `use_xformers`; in ComfyUI the
pack uses ComfyUI's own optimized attention instead, so `--disable-xformers` holds there); a broken xformers
install is imported lazily, warned about once, and replaced by SDPA.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

# What a broken or mismatched xformers raises on import or in its kernel (not out-of-memory: that re-raises).
_XFORMERS_FAILURES = (ImportError, OSError, RuntimeError, NotImplementedError, AttributeError, TypeError)

_log = logging.getLogger(__name__)
_xformers_allowed = True  # the host's default choice; see `set_xformers_enabled`
_xformers_failure: str | None = None  # set by the first failure; SDPA from then on


def set_xformers_enabled(enabled: bool) -> None:
    """Let a host switch xformers off for every call that does not pass `use_xformers` itself."""
    global _xformers_allowed
    _xformers_allowed = bool(enabled)


@functools.cache
def _xformers_installed() -> bool:
    """Found on the path, checked once and not imported (importing is what a broken install fails)."""
    return importlib.util.find_spec("xformers") is not None


def _xformers_can_run(device: torch.device | str) -> bool:
    """xformers is installed and the tensors are on CUDA (its only device here)."""
    return torch.device(device).type == "cuda" and _xformers_installed()


def attention_backend_name(device: torch.device | str, use_xformers: bool | None = None) -> str:
    """Name of the kernel unmasked `attention` uses on `device` (`use_xformers` None: the host's default)."""
    allowed = _xformers_allowed if use_xformers is None else use_xformers
    if allowed and _xformers_failure is None and _xformers_can_run(device):
        return "xformers"
    return "sdpa"


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads)  # (B, N, H, D)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    import xformers.ops  # lazily: a broken install must not break importing SuTI

    out = xformers.ops.memory_efficient_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    )  # (B, N, H, D)
    return out.flatten(2)


def _give_up_xformers(err: BaseException) -> None:
    """Remember the failure and warn once, so a broken install costs one message instead of the sampling run."""
    global _xformers_failure
    _xformers_failure = f"{type(err).__name__}: {err}"
    _log.warning(
        "SuTI: xformers failed (%s); SuTI falls back to PyTorch SDPA for the rest of this session. "
        "Reinstall an xformers build matching your torch/CUDA, or uninstall xformers.",
        _xformers_failure,
    )


def _xformers_or_none(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor | None:
    """xformers' result (B, N, H*D), or None when it fails (the caller then uses SDPA)."""
    try:
        return _xformers_attention(q, k, v, heads)
    except torch.OutOfMemoryError:
        raise  # SDPA would need the memory too; not a broken install
    except _XFORMERS_FAILURES as err:
        _give_up_xformers(err)
        return None


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    mask: torch.Tensor | None) -> torch.Tensor:
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M)
    out = F.scaled_dot_product_attention(
        _split_heads(q, heads).transpose(1, 2),
        _split_heads(k, heads).transpose(1, 2),
        _split_heads(v, heads).transpose(1, 2),
        attn_mask=attn_mask,
    )  # (B, H, N, D)
    return out.transpose(1, 2).flatten(2)  # (B, N, H*D)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    use_xformers: bool | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; `mask` (B or 1, M) bool marks the keys that may be attended, or as a float
    (B or 1, M) in q's dtype is added to the logits (always SDPA).

    `use_xformers` is the host's choice (None: `set_xformers_enabled`'s default, on).
    """
    if q.shape[-1] % heads != 0:
        raise ValueError(f"query width {q.shape[-1]} is not divisible by heads={heads}")
    if mask is None and attention_backend_name(q.device, use_xformers) == "xformers":
        out = _xformers_or_none(q, k, v, heads)
        if out is not None:
            return out
    return _sdpa_attention(q, k, v, heads, mask)
