"""Neighbor (demonstration) attention of SuTI / Re-Imagen: block queries attend to demo features."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention_backend import attention

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, heads, mask=None) -> (B, N, H*D), e.g. ComfyUI's optimized
# `mask` given to an AttentionFn: (B or 1, M) bool, or an additive float bias (1, M) (ComfyUI's optimized attention
# reads a 2-D float mask as (N or 1, M) and broadcasts it to (B, heads, N, M), so only (1, M) means the same there)


class NeighborAttention(nn.Module):
    """Cross-attention from a block's hidden states to neighbor features; returns a residual delta.

    The output projection starts at zero (weight and bias), so an untrained adapter is a no-op.
    """

    def __init__(self, query_dim: int, neighbor_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.query_dim = query_dim
        self.neighbor_dim = neighbor_dim
        self.heads = heads
        self.norm = nn.LayerNorm(query_dim)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(neighbor_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(neighbor_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def _check_shapes(self, hidden: torch.Tensor, neighbors: torch.Tensor, neighbor_mask: torch.Tensor | None) -> None:
        if hidden.ndim != 3 or hidden.shape[-1] != self.query_dim:
            raise ValueError(f"hidden must be (B, N, {self.query_dim}), got {tuple(hidden.shape)}")
        if neighbors.ndim != 3 or neighbors.shape[-1] != self.neighbor_dim:
            raise ValueError(f"neighbors must be (B or 1, M, {self.neighbor_dim}), got {tuple(neighbors.shape)}")
        if neighbors.shape[0] not in (1, hidden.shape[0]):
            raise ValueError(
                f"neighbors batch {neighbors.shape[0]} must be 1 or match hidden batch {hidden.shape[0]} "
                f"(hidden {tuple(hidden.shape)}, neighbors {tuple(neighbors.shape)})"
            )
        if neighbor_mask is not None and (
            neighbor_mask.ndim != 2
            or neighbor_mask.shape[1] != neighbors.shape[1]
            or neighbor_mask.shape[0] not in (1, hidden.shape[0])
        ):
            raise ValueError(
                f"neighbor_mask must be (B or 1, {neighbors.shape[1]}) bool, got {tuple(neighbor_mask.shape)} "
                f"for hidden {tuple(hidden.shape)} and neighbors {tuple(neighbors.shape)}"
            )

    def neighbor_kv(self, neighbors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (1 or B, M, H*D) of neighbor features (1 or B, M, Cn): computable once per run."""
        return self.to_k(neighbors), self.to_v(neighbors)

    def attend(
        self,
        hidden: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        neighbor_mask: torch.Tensor | None = None,
        attention_fn: AttentionFn = attention,
        neighbor_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Residual delta (B, N, C) for hidden (B, N, C) attending to projected neighbors (`neighbor_kv`);
        `neighbor_bias` (1, M) is added to every query's logits (log demo weights, `demo_logit_biases`)."""
        batch = hidden.shape[0]
        k, v = (t.expand(batch, -1, -1) for t in kv)  # (B, M, H*D)
        q = self.to_q(self.norm(hidden))  # (B, N, H*D)
        if neighbor_mask is not None:
            neighbor_mask = neighbor_mask.to(torch.bool).expand(batch, -1)  # (B, M)
        mask = _logit_mask(neighbor_mask, neighbor_bias, q)  # (B or 1, M) or None
        out = self.to_out(attention_fn(q, k, v, self.heads, mask=mask))  # (B, N, C)
        if neighbor_mask is not None:
            # a row with no valid neighbor gets no update (SDPA would return NaN there)
            has_neighbor = neighbor_mask.any(dim=1)[:, None, None]  # (B, 1, 1)
            out = torch.where(has_neighbor, out, torch.zeros_like(out))
        return out

    def forward(
        self,
        hidden: torch.Tensor,
        neighbors: torch.Tensor,
        neighbor_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Residual delta (B, N, C) for hidden (B, N, C) attending to neighbors (B or 1, M, Cn)."""
        self._check_shapes(hidden, neighbors, neighbor_mask)
        return self.attend(hidden, self.neighbor_kv(neighbors), neighbor_mask)


def _logit_mask(mask: torch.Tensor | None, bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """What attention_fn gets: the bool mask (B, M), the float bias (1, M) in q's dtype, or both as a bias (B, M)."""
    if bias is None:
        return mask
    if bias.ndim != 2 or bias.shape[0] != 1:
        raise ValueError(f"neighbor_bias must be (1, M) float, got {tuple(bias.shape)}")
    bias = bias.to(q.dtype)
    return bias if mask is None else torch.where(mask, bias, float("-inf"))  # (B, M)


def neighbor_delta(
    module: NeighborAttention,
    hidden: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    row_weights: torch.Tensor,
    neighbor_mask: torch.Tensor | None = None,
    attention_fn: AttentionFn = attention,
    neighbor_bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """SuTI's residual after a block's self-attention, w_row * NA(hidden) (B, N, C), or None when every row's
    weight is 0. Rows of weight 0 (the unconditional pass with `cond only`) are not computed at all; the adapter
    runs in its own dtype and the result comes back in hidden's."""
    rows = (row_weights != 0).nonzero().flatten()  # row_weights: (B,); a CPU tensor spares a GPU sync here
    if rows.numel() == 0:
        return None
    every_row = rows.numel() == hidden.shape[0]
    rows_here = rows.to(hidden.device)
    selected = hidden if every_row else hidden[rows_here]
    mask = neighbor_mask if neighbor_mask is None or neighbor_mask.shape[0] == 1 else neighbor_mask[rows_here]
    kv = tuple(t if t.shape[0] == 1 else t[rows_here] for t in kv)
    dtype = module.to_out.weight.dtype
    delta = module.attend(selected.to(dtype), kv, mask, attention_fn, neighbor_bias).to(hidden.dtype)  # (b, N, C)
    delta = row_weights[rows].to(hidden)[:, None, None] * delta  # row_weights and rows on one device
    return delta if every_row else torch.zeros_like(hidden).index_add_(0, rows_here, delta)
