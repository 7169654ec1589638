"""SuTI on a diffusers UNet: the training host of the neighbor-attention adapter.

It computes what ComfyUI's SuTI Apply computes (nodes/) with the same adapter file: demo features are the
inputs of each down/middle (and, with `encoder+decoder`, up) transformer block's self-attention (norm1(x))
for clean demo latents at the schedule's smallest sigma, concatenated across a subject's demos; in every
block the adapter adds `NeighborAttention(x, neighbors)` right after self-attention's residual (ComfyUI's
`middle_patch`). Blocks are named by their LDM keys through training/keymap.py, so the trained adapter
loads in ComfyUI unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from suti_core.adapter import SuTIAdapter, new_adapter_for_blocks
from suti_core.demo_features import DemoFeatures, FeatureRecorder, block_specs, needs_decoder
from suti_core.neighbor_attention import neighbor_delta

from .keymap import unet_key_map


@dataclass(frozen=True)
class HostBlock:
    """A diffusers transformer block with its LDM key, resolution level (0 = full latent size) and the
    Transformer2DModel holding it (whose input shape gives the block's token grid)."""

    key: str
    level: int
    block: BasicTransformerBlock
    transformer: torch.nn.Module


def _blocks_in_execution_order(unet: UNet2DConditionModel) -> Iterator[tuple[str, int, int, BasicTransformerBlock, torch.nn.Module]]:
    """(diffusers prefix of the Transformer2DModel, block index, level, block, transformer): down, middle, up."""
    levels = len(unet.down_blocks)
    groups = [(f"down_blocks.{i}", i, b) for i, b in enumerate(unet.down_blocks)]
    groups += [("mid_block", levels - 1, unet.mid_block)]
    groups += [(f"up_blocks.{i}", levels - 1 - i, b) for i, b in enumerate(unet.up_blocks)]
    for prefix, level, group in groups:
        for j, transformer in enumerate(getattr(group, "attentions", None) or []):
            for index, block in enumerate(transformer.transformer_blocks):
                yield f"{prefix}.attentions.{j}", index, level, block, transformer


class _StopAfterMiddleBlock(Exception):
    """Encoder-only demo features need only the down and middle blocks."""


class DiffusersSuTIHost:
    """Neighbor attention for a frozen diffusers UNet: its block layout, demo encoding and the adapter hooks."""

    def __init__(self, unet: UNet2DConditionModel, alphas_cumprod: torch.Tensor, architecture: str = "toy",
                 feature_source: str = "encoder", finest_heads: int = 0, reads_prompt: bool = False):
        self.unet, self.architecture, self.reads_prompt = unet, architecture, reads_prompt
        levels = len(unet.down_blocks)
        attention = tuple(hasattr(b, "attentions") for b in unet.down_blocks)
        modules = unet_key_map(levels, unet.config.layers_per_block, attention)
        self.blocks = tuple(HostBlock(f"{modules[prefix]}.transformer_blocks.{index}", level, block, transformer)
                            for prefix, index, level, block, transformer in _blocks_in_execution_order(unet))
        self.block_specs = block_specs(((b.key, b.level, b.block.norm1.normalized_shape[0], b.block.attn1.heads,
                                         b.block.attn1.inner_dim // b.block.attn1.heads) for b in self.blocks),
                                       feature_source, finest_heads)
        self.block_map = {spec.key: spec.source_key for spec in self.block_specs}
        self.source_keys = frozenset(self.block_map.values())
        sigma_min = ((1 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt()
        self.demo_input_scale = float(1 / (sigma_min**2 + 1).sqrt())  # ComfyUI's eps c_in at sigma_min (t = 0)

    @property
    def context_dim(self) -> int:
        return self.blocks[0].block.attn2.to_k.in_features

    def new_adapter(self) -> SuTIAdapter:
        """A zero-initialised adapter for this UNet (a no-op until trained)."""
        return new_adapter_for_blocks(self.architecture, self.context_dim, self.block_specs, self.reads_prompt)

    @torch.no_grad()
    def encode_demos(self, latents: torch.Tensor, context: torch.Tensor, demos_per_sample: int,
                     masks: Sequence[torch.Tensor | None] | None = None,
                     added: dict[str, torch.Tensor] | None = None) -> DemoFeatures:
        """Neighbor features per source block key, (B, demos_per_sample * tokens, C), from clean demo latents
        (B * demos_per_sample, C, h, w) grouped by sample, each with its own caption context (B * n, T, D),
        optional subject mask (H, W) and, for SDXL, added conditioning (`added_cond_kwargs`, B * n rows)."""
        recorder = FeatureRecorder(self.source_keys)
        handles = []
        for b in self.blocks:
            if b.key in self.source_keys:
                grid: dict[str, tuple[int, int]] = {}
                handles.append(b.transformer.register_forward_pre_hook(self._grid_of(grid)))
                handles.append(b.block.attn1.register_forward_pre_hook(self._recorder(b.key, recorder, grid, masks)))
        if not needs_decoder(self.source_keys):
            handles.append(self.unet.mid_block.register_forward_hook(self._stop))
        try:
            timestep = torch.zeros(latents.shape[0], device=latents.device)
            self.unet(latents * self.demo_input_scale, timestep, context, added_cond_kwargs=added)
        except _StopAfterMiddleBlock:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return recorder.features(groups=latents.shape[0] // demos_per_sample)

    @staticmethod
    def _grid_of(grid: dict[str, tuple[int, int]]):
        def hook(module, args):
            grid["hw"] = tuple(args[0].shape[-2:])  # the Transformer2DModel's input (B, C, h, w)
        return hook

    @staticmethod
    def _recorder(key: str, recorder: FeatureRecorder, grid: dict[str, tuple[int, int]], masks):
        def hook(module, args):
            recorder.record(key, args[0], grid["hw"], masks)  # norm1(x): (B * n, h*w, C)
        return hook

    @staticmethod
    def _stop(module, args, output):
        raise _StopAfterMiddleBlock

    @contextmanager
    def neighbor_attention(self, adapter: SuTIAdapter, features: DemoFeatures,
                           strength: float = 1.0) -> Iterator[None]:
        """Within the block, UNet calls add `strength * adapter(x, neighbors)` after each self-attention (an
        adapter that reads the prompt gets the block's cross-attention context)."""
        handles = []
        for b in self.blocks:
            if b.key not in self.block_map:
                continue
            module = adapter.block(b.key)
            kv = module.neighbor_kv(features.for_block(b.key, self.block_map))  # once per forward, as ComfyUI per run
            mask = features.mask_for_block(b.key, self.block_map)
            inputs: dict[str, torch.Tensor] = {}
            handles.append(b.block.register_forward_pre_hook(self._keep_input(inputs), with_kwargs=True))
            handles.append(b.block.attn1.register_forward_hook(
                self._add_neighbor_attention(module, kv, mask, inputs, strength)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _keep_input(inputs: dict[str, torch.Tensor]):
        def hook(module, args, kwargs):
            inputs["x"] = args[0] if args else kwargs["hidden_states"]
            inputs["prompt"] = kwargs.get("encoder_hidden_states")
        return hook

    @staticmethod
    def _add_neighbor_attention(module, kv, mask, inputs: dict[str, torch.Tensor], strength: float):
        def hook(attn, args, output):
            # x1 = x + attn1(norm1(x)); ComfyUI's middle_patch then adds SuTI's residual on x1: fold it into
            # attn1's output
            x1 = inputs["x"] + output
            delta = neighbor_delta(module, x1, kv, torch.full((x1.shape[0],), strength), mask,
                                   prompt=inputs["prompt"])
            return output if delta is None else output + delta
        return hook
