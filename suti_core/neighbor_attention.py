"""Neighbor (demonstration) attention of SuTI / Re-Imagen: block queries attend to demo features."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention_backend import attention

PROMPT_LOGIT = -2.0  # the prompt tokens' logit offset at the start: their values start at zero, so an adapter gaining
# them adds nothing and only cedes them a few % of its attention (at -6 they took ~0.1 %, too little to learn from)
AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, heads, mask=None) -> (B, N, H*D), e.g. ComfyUI's optimized
# `mask` given to an AttentionFn: (B or 1, M) bool, or an additive float bias (1, M) (ComfyUI's optimized attention
# reads a 2-D float mask as (N or 1, M) and broadcasts it to (B, heads, N, M), so only (1, M) means the same there)


class NeighborAttention(nn.Module):
    """Cross-attention from a block's hidden states to neighbor features; returns a residual delta.

    The output projection starts at zero (weight and bias), so an untrained adapter is a no-op.

    With `prompt_dim`, the prompt's tokens (the block's cross-attention context) join the demos' as keys and values
    (joint attention, logits offset by PROMPT_LOGIT, projections starting at zero): the queries see the prompt only
    through earlier blocks, so without them the demos' colours win where the prompt asks another ("a purple dog").
    """

    def __init__(self, query_dim: int, neighbor_dim: int, heads: int, dim_head: int, prompt_dim: int = 0) -> None:
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
        self.to_k_prompt = self.to_v_prompt = None
        if prompt_dim:
            self.to_k_prompt = nn.Linear(prompt_dim, inner_dim, bias=False)
            self.to_v_prompt = nn.Linear(prompt_dim, inner_dim, bias=False)
            nn.init.zeros_(self.to_k_prompt.weight)
            nn.init.zeros_(self.to_v_prompt.weight)

    @property
    def reads_prompt(self) -> bool:
        """Whether the prompt's tokens are among the keys (`attend` then needs `prompt`)."""
        return self.to_k_prompt is not None

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
        prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Residual delta (B, N, C) for hidden (B, N, C) attending to projected neighbors (`neighbor_kv`);
        `neighbor_bias` (1, M) is added to every query's logits (log demo weights, `demo_logit_biases`); `prompt`
        (B, T, Dp): each row's prompt tokens, for an adapter that reads them."""
        batch = hidden.shape[0]
        k, v = (t.expand(batch, -1, -1) for t in kv)  # (B, M, H*D)
        q = self.to_q(self.norm(hidden))  # (B, N, H*D)
        if neighbor_mask is not None:
            neighbor_mask = neighbor_mask.to(torch.bool).expand(batch, -1)  # (B, M)
        mask = _logit_mask(neighbor_mask, neighbor_bias, q)  # (B or 1, M) or None
        if self.reads_prompt:
            k, v, mask = self._with_prompt(k, v, mask, prompt)
        out = self.to_out(attention_fn(q, k, v, self.heads, mask=mask))  # (B, N, C)
        if neighbor_mask is not None:
            # a row with no valid neighbor gets no update (SDPA would return NaN there)
            has_neighbor = neighbor_mask.any(dim=1)[:, None, None]  # (B, 1, 1)
            out = torch.where(has_neighbor, out, torch.zeros_like(out))
        return out

    def _with_prompt(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     prompt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (B, M + T, H*D) with the prompt's tokens after the demos', and the logit mask (B or 1,
        M + T) giving those PROMPT_LOGIT."""
        if prompt is None or prompt.ndim != 3 or prompt.shape[0] != k.shape[0]:
            raise ValueError(f"this adapter also attends to the prompt: pass its tokens (B={k.shape[0]}, T, D), got "
                             f"{None if prompt is None else tuple(prompt.shape)}")
        prompt = prompt.to(k)
        if mask is None or mask.dtype == torch.bool:  # the demos' part of the logit mask as an additive bias
            mask = _masked_bias(mask, torch.zeros(1, k.shape[1], dtype=k.dtype, device=k.device))
        k = torch.cat([k, self.to_k_prompt(prompt)], dim=1)
        v = torch.cat([v, self.to_v_prompt(prompt)], dim=1)
        return k, v, F.pad(mask, (0, prompt.shape[1]), value=PROMPT_LOGIT)

    def forward(
        self,
        hidden: torch.Tensor,
        neighbors: torch.Tensor,
        neighbor_mask: torch.Tensor | None = None,
        prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Residual delta (B, N, C) for hidden (B, N, C) attending to neighbors (B or 1, M, Cn) (and, for an
        adapter that reads it, the prompt (B, T, Dp))."""
        self._check_shapes(hidden, neighbors, neighbor_mask)
        return self.attend(hidden, self.neighbor_kv(neighbors), neighbor_mask, prompt=prompt)


def _logit_mask(mask: torch.Tensor | None, bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """What attention_fn gets: the bool mask (B, M), the float bias (1, M) in q's dtype, or both as a bias (B, M)."""
    if bias is None:
        return mask
    if bias.ndim != 2 or bias.shape[0] != 1:
        raise ValueError(f"neighbor_bias must be (1, M) float, got {tuple(bias.shape)}")
    return _masked_bias(mask, bias.to(q.dtype))


def _masked_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """The additive logit bias (1, M), or (B, M) with -inf where the bool mask (B, M) excludes a neighbor."""
    return bias if mask is None else torch.where(mask, bias, float("-inf"))


def neighbor_delta(
    module: NeighborAttention,
    hidden: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    row_weights: torch.Tensor,
    neighbor_mask: torch.Tensor | None = None,
    attention_fn: AttentionFn = attention,
    neighbor_bias: torch.Tensor | None = None,
    prompt: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """SuTI's residual after a block's self-attention, w_row * NA(hidden) (B, N, C), or None when every row's
    weight is 0. Rows of weight 0 (the unconditional pass with `cond only`) are not computed at all; the adapter
    runs in its own dtype and the result comes back in hidden's. `prompt` (B, T, Dp), the block's cross-attention
    context, is read only by an adapter that reads the prompt."""
    rows = (row_weights != 0).nonzero().flatten()  # row_weights: (B,); a CPU tensor spares a GPU sync here
    if rows.numel() == 0:
        return None
    every_row = rows.numel() == hidden.shape[0]
    rows_here = rows.to(hidden.device)
    selected = hidden if every_row else hidden[rows_here]
    mask = neighbor_mask if neighbor_mask is None or neighbor_mask.shape[0] == 1 else neighbor_mask[rows_here]
    kv = tuple(t if t.shape[0] == 1 else t[rows_here] for t in kv)
    prompt = prompt if module.reads_prompt else None  # hosts hand the prompt over whatever the adapter reads
    if prompt is not None and not every_row:
        prompt = prompt[rows.to(prompt.device)]  # ComfyUI hands c_crossattn over before casting it to the UNet's device
    dtype = module.to_out.weight.dtype
    delta = module.attend(selected.to(dtype), kv, mask, attention_fn, neighbor_bias, prompt).to(hidden.dtype)  # (b, N, C)
    delta = row_weights[rows].to(hidden)[:, None, None] * delta  # row_weights and rows on one device
    return delta if every_row else torch.zeros_like(hidden).index_add_(0, rows_here, delta)
