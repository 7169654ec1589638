"""Training-free mode: the demos' features appended to each block's self-attention (no learned weights).

Each SuTI Apply's replace wraps the attn1 replace already on its block (Self-Attention Guidance, an earlier
SuTI Apply, another pack's) and adds its own demo term to that one's output, so patches compose in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import torch

from ..suti_core.demo_features import block_key
from .layout import key_of
from .settings import SharedReadOnly, SuTISettings

Block = tuple[str, int, int]  # ComfyUI's (block name, block id, transformer index)


@dataclass(frozen=True)
class AppendedTokens:
    """Where one apply's demo tokens sit in a block call's self-attention keys, with their row weights (B,) and
    logit biases (1, stop - start) when demo weights differ."""

    start: int
    stop: int
    weights: torch.Tensor
    bias: torch.Tensor | None = None


def _tokens_key(settings: SuTISettings) -> str:
    """Where an apply's ReferenceKeysPatch leaves its AppendedTokens for its replace in the same block call."""
    return f"{settings.features_key}_tokens"


class ReferenceKeysPatch(SharedReadOnly):
    """attn1_patch: append the demo features (the subject's tokens when demos carry masks) to self-attention's
    keys and values."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        key = key_of(extra_options)
        run = self.settings.run(extra_options)
        found = None if run is None else run.neighbors.get(key)
        if found is None or found[0].shape[-1] != context.shape[-1]:
            return n, context, value  # no features at this resolution, or another width (training-free needs equal)
        weights = self.settings.row_weights(key, n, extra_options)
        if weights is None:
            return n, context, value
        neighbors, bias = found  # (1, M, C), (1, M) or None
        neighbors = neighbors.to(context).expand(context.shape[0], -1, -1)  # (B, M, C)
        start = context.shape[1]  # after the plain tokens and any earlier apply's demo tokens
        extra_options[_tokens_key(self.settings)] = AppendedTokens(start, start + neighbors.shape[1], weights, bias)
        return n, torch.cat([context, neighbors], dim=1), torch.cat([value, neighbors], dim=1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """ComfyUI's optimized attention as the block would run it, with an optional additive logit bias (1, M) that
    it broadcasts to (B, heads, N, M): (B, N, H*D)."""
    return comfy_attention.optimized_attention(
        q, k, v, extra_options["n_heads"], mask=bias, attn_precision=extra_options.get("attn_precision"),
        transformer_options=extra_options,
    )


def _key_bias(q: torch.Tensor, tokens: int, appended: AppendedTokens) -> torch.Tensor | None:
    """Logit bias (1, N + M) of `_with_tokens`' keys: 0 on the image's own, the demo weights' on the demos'."""
    if appended.bias is None:
        return None
    own = torch.zeros(1, tokens, dtype=q.dtype, device=q.device)
    return torch.cat([own, appended.bias.to(q)], dim=1)


def _with_tokens(t: torch.Tensor, tokens: int, appended: AppendedTokens) -> torch.Tensor:
    """The plain tokens followed by one apply's demo tokens: (B, N + M, C)."""
    if appended.start == tokens:
        return t[:, : appended.stop]
    return torch.cat([t[:, :tokens], t[:, appended.start : appended.stop]], dim=1)


class ReferenceBlendReplace(SharedReadOnly):
    """attn1_replace: the wrapped replace's output (plain self-attention without one) plus strength times this
    apply's demo term, demo-augmented minus plain self-attention, limited to its region mask per token; chained
    applies add their terms."""

    def __init__(self, settings: SuTISettings, inner: Callable | None = None) -> None:
        self.settings, self.inner = settings, inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        return self.attend(q, k, v, extra_options)[0]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, plain self-attention or None where not computed yet), all (B, N, H*D)."""
        tokens = q.shape[1]  # self-attention: the first `tokens` keys are the image's own
        if isinstance(self.inner, ReferenceBlendReplace):
            out, plain = self.inner.attend(q, k, v, extra_options)
        elif self.inner is not None:  # e.g. SAG: sees the plain tokens, once, so it records the plain map
            out, plain = self.inner(q, k[:, :tokens], v[:, :tokens], extra_options), None
        else:
            out = plain = _attention(q, k[:, :tokens], v[:, :tokens], extra_options)
        appended = extra_options.get(_tokens_key(self.settings))
        if appended is None:
            return out, plain  # ReferenceKeysPatch left this block alone
        if plain is None:
            plain = _attention(q, k[:, :tokens], v[:, :tokens], extra_options)
        augmented = _attention(q, _with_tokens(k, tokens, appended), _with_tokens(v, tokens, appended), extra_options,
                               _key_bias(q, tokens, appended))
        term = appended.weights.to(out)[:, None, None] * (augmented - plain)  # (B, N, H*D)
        return out + self.settings.place(term, extra_options), plain


def attn1_replace_of(transformer_options: dict, block: Block) -> Callable | None:
    """The attn1 replace ComfyUI calls for `block`: its own key first, then the whole block's (name, id)."""
    replaces = transformer_options.get("patches_replace", {}).get("attn1", {})
    return replaces.get(block, replaces.get(block[:2]))


def _describe(patch: Callable | None) -> str:
    """A replace's module and qualified name, which names the node that set it (e.g. nodes_sag...)."""
    if patch is None:
        return "none (removed)"
    return f"{patch.__module__}.{getattr(patch, '__qualname__', type(patch).__qualname__)}"


def check_replace_kept(transformer_options: dict, block: Block, mine: ReferenceBlendReplace) -> None:
    """ValueError when a later node put an attn1 replace on `block` that does not wrap this apply's."""
    found = attn1_replace_of(transformer_options, block)
    while isinstance(found, ReferenceBlendReplace) and found is not mine:
        found = found.inner
    if found is mine:
        return
    raise ValueError(
        f"a node after SuTI Apply replaced its self-attention on block {block_key(*block)} with its own "
        f"({_describe(found)}), which cannot take SuTI's demo tokens (Self-Attention Guidance would fail on them); "
        f"connect that node before SuTI Apply (model -> that node -> SuTI Apply -> KSampler), or set SuTI Apply's "
        f"block_weights to '{block[0]}:0' to leave those blocks to it"
    )


class CheckReplacesKept(SharedReadOnly):
    """OUTER_SAMPLE wrapper: before sampling, every block this apply patched must still reach its replace."""

    def __init__(self, replaces: dict[Block, ReferenceBlendReplace]) -> None:
        self.replaces = replaces

    def __call__(self, executor, *args, **kwargs):
        transformer_options = executor.class_obj.model_options.get("transformer_options", {})
        for block, mine in self.replaces.items():
            check_replace_kept(transformer_options, block, mine)
        return executor(*args, **kwargs)
