"""The UNet as SuTI sees it in ComfyUI: architecture, text width and transformer blocks with their block map."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..suti_core.adapter import SuTIAdapter
from ..suti_core.adapter_format import BlockSpec, check_adapter_matches_model
from ..suti_core.demo_features import block_key, block_specs, finest_level

_ARCHITECTURE_OF_CONFIG = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl"}  # comfy.supported_models classes


@dataclass(frozen=True)
class ModelLayout:
    """What SuTI needs to know of a UNet: architecture, text context width, its transformer blocks and the finest
    resolution level they reach (0: the latent's own size; SDXL's first level has none, so 1)."""

    architecture: str
    context_dim: int
    blocks: tuple[BlockSpec, ...]
    finest_level: int

    @property
    def block_map(self) -> dict[str, str]:
        return {b.key: b.source_key for b in self.blocks}

    @property
    def source_keys(self) -> frozenset[str]:
        return frozenset(b.source_key for b in self.blocks)


def key_of(extra_options: dict) -> str:
    """Block key of the transformer block a patch is called from."""
    name, block_id = extra_options["block"]
    return block_key(name, block_id, extra_options["block_index"])


def walk_transformer_blocks(diffusion_model: torch.nn.Module) -> Iterator[tuple[str, int, torch.nn.Module]]:
    """Yield (block key, resolution level, BasicTransformerBlock) in execution order."""
    level = 0
    groups = (
        ("input", diffusion_model.input_blocks),
        ("middle", [diffusion_model.middle_block] if diffusion_model.middle_block is not None else []),
        ("output", diffusion_model.output_blocks),
    )
    for name, blocks in groups:
        for block_id, block in enumerate(blocks):
            for position, layer in enumerate(block):
                if isinstance(layer, comfy_attention.SpatialTransformer) and position == 1:
                    for index, transformer in enumerate(layer.transformer_blocks):
                        yield block_key(name, block_id, index), level, transformer
                level += isinstance(layer, Downsample) - isinstance(layer, Upsample)


def _architecture(model_patcher: comfy.model_patcher.ModelPatcher) -> str:
    """sd1/sd2/sdxl from ComfyUI's model config class; a config may name its own (`suti_architecture`)."""
    config = getattr(model_patcher.model, "model_config", None)
    if hasattr(config, "suti_architecture"):
        return config.suti_architecture
    for cls in type(config).__mro__:
        if cls.__name__ in _ARCHITECTURE_OF_CONFIG:
            return _ARCHITECTURE_OF_CONFIG[cls.__name__]
    return "custom"


def describe_model(model_patcher: comfy.model_patcher.ModelPatcher, feature_source: str = "encoder") -> ModelLayout:
    """The model's transformer blocks with their block map for `feature_source`; ValueError when it has none
    SuTI can patch."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    found = list(walk_transformer_blocks(diffusion_model)) if hasattr(diffusion_model, "input_blocks") else []
    if not found:
        raise ValueError(
            f"the model ({type(diffusion_model).__name__}) has no UNet transformer blocks "
            "(input_blocks.N.1.transformer_blocks); SuTI patches SD1.x/SD2.x/SDXL-style UNets: load such a checkpoint"
        )
    specs = block_specs(
        ((key, level, block.norm1.normalized_shape[0], block.n_heads, block.d_head) for key, level, block in found),
        feature_source,
    )
    return ModelLayout(_architecture(model_patcher), found[0][2].attn2.to_k.in_features, specs,
                       finest_level(found))


def check_adapter_for_model(adapter: SuTIAdapter, layout: ModelLayout) -> None:
    """AdapterMismatchError naming the difference when `adapter` was made for another base model."""
    check_adapter_matches_model(adapter.metadata, layout.architecture, layout.context_dim, layout.blocks)
