"""Adapter mode: SuTI's learned neighbor attention as a residual after every block's self-attention."""

from __future__ import annotations

import copy

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import torch

from ..suti_core.adapter import SuTIAdapter
from ..suti_core.neighbor_attention import neighbor_delta
from .layout import key_of
from .settings import SharedReadOnly, SuTISettings

PROMPT_KEY = "suti_prompt"  # transformer_options entry: the batch's cross-attention context (PassPrompt)


class NeighborResidualPatch(SharedReadOnly):
    """middle_patch: x + strength * w_block * m * NeighborAttention(x, neighbors) (SuTI's learned adapter; m: the
    region mask per token, 1 without one)."""

    def __init__(self, adapter_patcher: comfy.model_patcher.ModelPatcher, settings: SuTISettings) -> None:
        self.adapter_patcher = adapter_patcher
        self.settings = settings

    def __call__(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
        key = key_of(extra_options)
        weights = self.settings.row_weights(key, x, extra_options)
        run = None if weights is None else self.settings.run(extra_options)
        if run is None or key not in run.kv:
            return x
        module = self.adapter_patcher.model.block(key)
        # kv holds only the subject's tokens (no mask), so ComfyUI's optimized attention (xformers, sage, ...) runs it;
        # demo weights come as an additive (1, M) float mask, which it broadcasts to (B, heads, N, M)
        delta = neighbor_delta(module, x, run.kv[key], weights, attention_fn=comfy_attention.optimized_attention,
                               neighbor_bias=run.neighbors[key][1],
                               prompt=extra_options.get(PROMPT_KEY))
        return x if delta is None else x + self.settings.place(delta, extra_options)

    def to(self, device_or_dtype) -> NeighborResidualPatch:
        return self  # the adapter's ModelPatcher (see models()) is placed by ComfyUI's model management

    def models(self) -> list[comfy.model_patcher.ModelPatcher]:
        return [self.adapter_patcher]


class PassPrompt(SharedReadOnly):
    """APPLY_MODEL wrapper: the batch's cross-attention context (c_crossattn, one row per batch row) into
    transformer_options, where an adapter that reads the prompt finds it (a middle_patch gets no context)."""

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        options = {**transformer_options, PROMPT_KEY: c_crossattn}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def adapter_model_patcher(adapter: SuTIAdapter) -> comfy.model_patcher.ModelPatcher:
    """Wrap an adapter so ComfyUI's model management loads and offloads it with the UNet."""
    return comfy.model_patcher.ModelPatcher(
        adapter,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def adapter_in_dtype(adapter_patcher: comfy.model_patcher.ModelPatcher,
                     dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    """The adapter as the UNet computes (fp16/bf16 UNets run it in their dtype); the loaded one stays as it is."""
    if next(adapter_patcher.model.parameters()).dtype == dtype:
        return adapter_patcher
    return adapter_model_patcher(copy.deepcopy(adapter_patcher.model).to(dtype))
