"""SuTI on a diffusers UNet: the training host of the neighbor-attention adapter.

It computes what ComfyUI's SuTI Apply computes (nodes/patching.py) with the same adapter file: demo
features are the inputs of each down/middle transformer block's self-attention (norm1(x)) for clean demo
latents at the schedule's smallest sigma, concatenated across a subject's demos; in every transformer
block the adapter adds `NeighborAttention(x, neighbors)` right after self-attention's residual (ComfyUI's
`middle_patch`). Blocks are named by their LDM keys through training/keymap.py, so the trained adapter
loads in ComfyUI unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from suti_core.adapter import SuTIAdapter, new_adapter_for_blocks
from suti_core.adapter_format import BlockSpec
from suti_core.demo_features import build_block_map

from .keymap import unet_key_map


@dataclass(frozen=True)
class HostBlock:
    """A diffusers transformer block with its LDM key and resolution level (0 = full latent size)."""

    key: str
    level: int
    block: BasicTransformerBlock


def _blocks_in_execution_order(unet: UNet2DConditionModel) -> Iterator[tuple[str, int, int, BasicTransformerBlock]]:
    """(diffusers prefix of the Transformer2DModel, block index, level, block): down, middle, then up blocks."""
    levels = len(unet.down_blocks)
    groups = [(f"down_blocks.{i}", i, b) for i, b in enumerate(unet.down_blocks)]
    groups += [("mid_block", levels - 1, unet.mid_block)]
    groups += [(f"up_blocks.{i}", levels - 1 - i, b) for i, b in enumerate(unet.up_blocks)]
    for prefix, level, group in groups:
        for j, transformer in enumerate(getattr(group, "attentions", None) or []):
            for index, block in enumerate(transformer.transformer_blocks):
                yield f"{prefix}.attentions.{j}", index, level, block


class _StopAfterMiddleBlock(Exception):
    """Demo encoding needs only the down and middle blocks."""


class DiffusersSuTIHost:
    """Neighbor attention for a frozen diffusers UNet: its block layout, demo encoding and the adapter hooks."""

    def __init__(self, unet: UNet2DConditionModel, alphas_cumprod: torch.Tensor, architecture: str = "toy"):
        self.unet, self.architecture = unet, architecture
        levels = len(unet.down_blocks)
        attention = tuple(hasattr(b, "attentions") for b in unet.down_blocks)
        modules = unet_key_map(levels, unet.config.layers_per_block, attention)
        self.blocks = tuple(HostBlock(f"{modules[prefix]}.transformer_blocks.{index}", level, block)
                            for prefix, index, level, block in _blocks_in_execution_order(unet))
        self.block_map = build_block_map((b.key, b.level) for b in self.blocks)
        self.source_keys = frozenset(self.block_map.values())
        sigma_min = ((1 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt()
        self.demo_input_scale = float(1 / (sigma_min**2 + 1).sqrt())  # ComfyUI's eps c_in at sigma_min (t = 0)

    @property
    def block_specs(self) -> tuple[BlockSpec, ...]:
        """What ComfyUI's describe_model reports for the same UNet."""
        dims = {b.key: b.block.norm1.normalized_shape[0] for b in self.blocks}
        return tuple(BlockSpec(b.key, dims[b.key], dims[self.block_map[b.key]], b.block.attn1.heads,
                               b.block.attn1.inner_dim // b.block.attn1.heads, self.block_map[b.key])
                     for b in self.blocks if b.key in self.block_map)

    @property
    def context_dim(self) -> int:
        return self.blocks[0].block.attn2.to_k.in_features

    def new_adapter(self) -> SuTIAdapter:
        """A zero-initialised adapter for this UNet (a no-op until trained)."""
        return new_adapter_for_blocks(self.architecture, self.context_dim, self.block_specs)

    @torch.no_grad()
    def encode_demos(self, latents: torch.Tensor, context: torch.Tensor, demos_per_sample: int) -> dict[str, torch.Tensor]:
        """Neighbor features per source block key, (B, demos_per_sample * HW, C), from clean scaled demo latents
        (B * demos_per_sample, C, h, w) grouped by sample, each with its own caption context (B * n, T, D)."""
        recorded: dict[str, torch.Tensor] = {}
        handles = [b.block.attn1.register_forward_pre_hook(self._recorder(b.key, recorded))
                   for b in self.blocks if b.key in self.source_keys]
        handles.append(self.unet.mid_block.register_forward_hook(self._stop))
        try:
            timestep = torch.zeros(latents.shape[0], device=latents.device)
            self.unet(latents * self.demo_input_scale, timestep, context)
        except _StopAfterMiddleBlock:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {key: h.reshape(-1, demos_per_sample * h.shape[1], h.shape[2]) for key, h in recorded.items()}

    @staticmethod
    def _recorder(key: str, recorded: dict[str, torch.Tensor]):
        def hook(module, args):
            recorded[key] = args[0].detach()  # norm1(x): (B * n, HW, C)
        return hook

    @staticmethod
    def _stop(module, args, output):
        raise _StopAfterMiddleBlock

    @contextmanager
    def neighbor_attention(self, adapter: SuTIAdapter, neighbors: dict[str, torch.Tensor],
                           strength: float = 1.0) -> Iterator[None]:
        """Within the block, UNet calls add `strength * adapter(x, neighbors)` after each self-attention."""
        handles = []
        for b in self.blocks:
            if b.key not in self.block_map:
                continue
            inputs: dict[str, torch.Tensor] = {}
            handles.append(b.block.register_forward_pre_hook(self._keep_input(inputs), with_kwargs=True))
            handles.append(b.block.attn1.register_forward_hook(
                self._add_neighbor_attention(adapter.block(b.key), neighbors[self.block_map[b.key]], inputs, strength)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _keep_input(inputs: dict[str, torch.Tensor]):
        def hook(module, args, kwargs):
            inputs["x"] = args[0] if args else kwargs["hidden_states"]
        return hook

    @staticmethod
    def _add_neighbor_attention(module, neighbors: torch.Tensor, inputs: dict[str, torch.Tensor], strength: float):
        def hook(attn, args, output):
            # x1 = x + attn1(norm1(x)); ComfyUI's middle_patch then gives x1 + strength * NA(x1): fold it into attn1's output
            x1 = inputs["x"] + output
            return output + strength * module(x1, neighbors)
        return hook
