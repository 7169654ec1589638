"""ComfyUI glue: the model's transformer blocks, demo encoding per sampling run, attention patches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..suti_core.adapter import SuTIAdapter
from ..suti_core.adapter_format import BlockSpec, check_adapter_matches_model
from ..suti_core.demo_features import (
    DemoFeatures,
    Demonstration,
    FeatureRecorder,
    block_key,
    build_block_map,
    parse_block_key,
)

_ARCHITECTURE_OF_CONFIG = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl"}  # comfy.supported_models classes


class SharedReadOnly:
    """Patch objects are immutable: ModelPatcher.clone()'s deepcopy shares them instead of copying tensors."""

    def __deepcopy__(self, memo: dict) -> SharedReadOnly:
        return self


# ---------------------------------------------------------------- the model's layout


@dataclass(frozen=True)
class ModelLayout:
    """What SuTI needs to know of a UNet: architecture, text context width and its transformer blocks."""

    architecture: str
    context_dim: int
    blocks: tuple[BlockSpec, ...]

    @property
    def block_map(self) -> dict[str, str]:
        return {b.key: b.source_key for b in self.blocks}

    @property
    def source_keys(self) -> frozenset[str]:
        return frozenset(b.source_key for b in self.blocks)


def _walk_transformer_blocks(diffusion_model: torch.nn.Module):
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


def describe_model(model_patcher: comfy.model_patcher.ModelPatcher) -> ModelLayout:
    """The model's transformer blocks with their block map; ValueError when it has none SuTI can patch."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    found = list(_walk_transformer_blocks(diffusion_model)) if hasattr(diffusion_model, "input_blocks") else []
    if not found:
        raise ValueError(
            f"the model ({type(diffusion_model).__name__}) has no UNet transformer blocks "
            "(input_blocks.N.1.transformer_blocks); SuTI patches SD1.x/SD2.x/SDXL-style UNets: load such a checkpoint"
        )
    block_map = build_block_map((key, level) for key, level, _ in found)
    dims = {key: block.norm1.normalized_shape[0] for key, _, block in found}
    specs = tuple(
        BlockSpec(key, dims[key], dims[block_map[key]], block.n_heads, block.d_head, block_map[key])
        for key, _, block in found
        if key in block_map
    )
    context_dim = found[0][2].attn2.to_k.in_features
    return ModelLayout(_architecture(model_patcher), context_dim, specs)


def check_adapter_for_model(adapter: SuTIAdapter, layout: ModelLayout) -> None:
    """AdapterMismatchError naming the difference when `adapter` was made for another base model."""
    check_adapter_matches_model(adapter.metadata, layout.architecture, layout.context_dim, layout.blocks)


# ---------------------------------------------------------------- demo encoding


def _key_of(extra_options: dict) -> str:
    """Block key of the transformer block a patch is called from."""
    name, block_id = extra_options["block"]
    return block_key(name, block_id, extra_options["block_index"])


class _StopAtOutputBlocks(Exception):
    """Raised by the recorder's output_block_patch: demo encoding needs only the down and middle blocks."""


def _stop_at_output_blocks(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
    raise _StopAtOutputBlocks


class _FeatureRecorderPatch:
    """attn1_patch recording norm1(x) of every block; returns its inputs unchanged."""

    def __init__(self, recorder: FeatureRecorder) -> None:
        self.recorder = recorder

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        self.recorder.record(_key_of(extra_options), n)  # (1, HW, C)
        return n, context, value


def _demo_input(base_model, demo: Demonstration, sigma: torch.Tensor, index: int, device: torch.device) -> torch.Tensor:
    """The demo latent as the UNet sees it at `sigma`: clean at sigma_min, else noised with fixed noise."""
    latent = base_model.process_latent_in(demo.latent.to(device))  # (1, C, h, w)
    if float(sigma) <= float(base_model.model_sampling.sigma_min):
        return latent
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(index)).to(latent)
    return base_model.model_sampling.noise_scaling(sigma.to(latent), noise, latent)


def _demo_conds(base_model, demo: Demonstration, x: torch.Tensor, device: torch.device) -> dict:
    """The model's extra conds (c_crossattn, SDXL's y, ...) for a demo's own caption."""
    cond = {"cross_attn": demo.conditioning.to(device), "noise": x, "latent_image": x, "device": device}
    if demo.pooled is not None:
        cond["pooled_output"] = demo.pooled.to(device)
    cond.update(width=x.shape[-1] * 8, height=x.shape[-2] * 8)
    extra = base_model.extra_conds(**cond)
    return {k: v.process_cond(batch_size=1, area=None, device=device).cond for k, v in extra.items()}


def encode_demo_features(
    base_model, demos: Sequence[Demonstration], source_keys: frozenset[str], sigma: torch.Tensor, device: torch.device
) -> DemoFeatures:
    """Run every demo through the input and middle blocks at `sigma`; record norm1(x) per block."""
    recorder = FeatureRecorder(source_keys)
    progress = comfy.utils.ProgressBar(len(demos))
    with torch.no_grad():
        for index, demo in enumerate(demos):
            comfy.model_management.throw_exception_if_processing_interrupted()
            options = {
                "patches": {
                    "attn1_patch": [_FeatureRecorderPatch(recorder)],
                    "output_block_patch": [_stop_at_output_blocks],
                }
            }
            x = _demo_input(base_model, demo, sigma, index, device)
            try:
                base_model.apply_model(
                    x,
                    sigma.reshape(1).to(device),
                    transformer_options=options,
                    **_demo_conds(base_model, demo, x, device),
                )
            except _StopAtOutputBlocks:
                pass
            progress.update(1)
    return DemoFeatures(recorder.features())


# ---------------------------------------------------------------- settings shared by all patches


@dataclass(frozen=True)
class SuTISettings:
    """One SuTI Apply: demos, strength, sigma range, per-group weights and the block map."""

    features_key: str  # where this apply's features live in transformer_options
    demos: tuple[Demonstration, ...]
    source_keys: frozenset[str]
    block_map: Mapping[str, str]
    strength: float
    sigma_start: float
    sigma_end: float
    group_weights: Mapping[str, float]
    cond_only: bool

    def row_scale(self, key: str, x: torch.Tensor, extra_options: dict) -> torch.Tensor | None:
        """Per-row weight (B, 1, 1) of the SuTI term for block `key`, or None when it is off."""
        sigma = float(extra_options["sigmas"].max())
        weight = self.strength * self.group_weights[parse_block_key(key)[0]]
        if weight == 0.0 or not self.sigma_end <= sigma <= self.sigma_start:
            return None
        chunks = extra_options.get("cond_or_uncond") or [0]
        rows = [0.0 if (self.cond_only and c == 1) else weight for c in chunks]
        if not any(rows):
            return None
        per_chunk = x.shape[0] // len(chunks)
        return torch.tensor(rows, dtype=x.dtype, device=x.device).repeat_interleave(per_chunk)[:, None, None]

    def neighbors(self, key: str, extra_options: dict) -> torch.Tensor | None:
        """This run's neighbor features (1, M, Cn) for block `key`, or None."""
        features: DemoFeatures | None = extra_options.get(self.features_key)
        return None if features is None else features.for_block(key, self.block_map)


# ---------------------------------------------------------------- adapter mode


class NeighborResidualPatch(SharedReadOnly):
    """middle_patch: x + strength * w_block * NeighborAttention(x, neighbors) (SuTI's learned adapter)."""

    def __init__(self, adapter_patcher: comfy.model_patcher.ModelPatcher, settings: SuTISettings) -> None:
        self.adapter_patcher = adapter_patcher
        self.settings = settings

    def __call__(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
        key = _key_of(extra_options)
        scale = self.settings.row_scale(key, x, extra_options)
        neighbors = None if scale is None else self.settings.neighbors(key, extra_options)
        if neighbors is None:
            return x
        module = self.adapter_patcher.model.block(key)
        param = module.to_out.weight
        delta = module(x.to(param), neighbors.to(param)).to(x.dtype)  # (B, N, C)
        return x + scale * delta

    def to(self, device_or_dtype) -> NeighborResidualPatch:
        return self  # the adapter's ModelPatcher (see models()) is placed by ComfyUI's model management

    def models(self) -> list[comfy.model_patcher.ModelPatcher]:
        return [self.adapter_patcher]


# ---------------------------------------------------------------- training-free mode


class ReferenceKeysPatch(SharedReadOnly):
    """attn1_patch: append the demo features to self-attention's keys and values."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        key = _key_of(extra_options)
        neighbors = self.settings.neighbors(key, extra_options)
        if neighbors is None or neighbors.shape[-1] != context.shape[-1]:
            return n, context, value  # no features at this resolution, or another width (training-free needs equal)
        if self.settings.row_scale(key, n, extra_options) is None:
            return n, context, value
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
        scale = self.settings.row_scale(_key_of(extra_options), q, extra_options)
        augmented = comfy_attention.optimized_attention(
            q, k, v, heads, attn_precision=precision, transformer_options=extra_options
        )
        return plain + scale * (augmented - plain)


# ---------------------------------------------------------------- per-run demo encoding


class EncodeDemosOncePerRun(SharedReadOnly):
    """SAMPLER_SAMPLE wrapper: encode demos with the loaded model (LoRA included) at t≈0, once per run."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, executor, guider, sigmas, extra_args, *args, **kwargs):
        model = guider.inner_model
        sigma = torch.tensor(float(model.model_sampling.sigma_min))
        features = encode_demo_features(
            model, self.settings.demos, self.settings.source_keys, sigma, guider.model_patcher.load_device
        )
        return executor(
            guider, sigmas, _with_features(extra_args, self.settings.features_key, features), *args, **kwargs
        )


class EncodeDemosEveryStep(SharedReadOnly):
    """PREDICT_NOISE wrapper: re-encode demos at each step's sigma (for benchmarks against 'once')."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, executor, x, timestep, model_options, seed):
        guider = executor.class_obj
        features = encode_demo_features(
            guider.inner_model,
            self.settings.demos,
            self.settings.source_keys,
            timestep.max().cpu(),
            guider.model_patcher.load_device,
        )
        options = _with_features({"model_options": model_options}, self.settings.features_key, features)[
            "model_options"
        ]
        return executor(x, timestep, options, seed)


def _with_features(extra_args: dict, features_key: str, features: DemoFeatures) -> dict:
    """A copy of the run's extra_args whose transformer_options carry this run's features."""
    model_options = extra_args["model_options"]
    transformer_options = {**model_options.get("transformer_options", {}), features_key: features}
    return {**extra_args, "model_options": {**model_options, "transformer_options": transformer_options}}


# ---------------------------------------------------------------- installing on a clone


def install_suti(
    clone: comfy.model_patcher.ModelPatcher,
    layout: ModelLayout,
    settings: SuTISettings,
    adapter_patcher: comfy.model_patcher.ModelPatcher | None,
    every_step: bool,
) -> None:
    """Patch `clone` (already a ModelPatcher.clone()): encoding wrapper + adapter or training-free patches."""
    if every_step:
        clone.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.PREDICT_NOISE, settings.features_key, EncodeDemosEveryStep(settings)
        )
    else:
        clone.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, settings.features_key, EncodeDemosOncePerRun(settings)
        )
    if adapter_patcher is not None:
        clone.set_model_patch(NeighborResidualPatch(adapter_patcher, settings), "middle_patch")
        return
    clone.set_model_attn1_patch(ReferenceKeysPatch(settings))
    replace = ReferenceBlendReplace(settings)
    for spec in layout.blocks:
        if spec.query_dim == spec.neighbor_dim:
            name, block_id, index = parse_block_key(spec.key)
            clone.set_model_attn1_replace(replace, name, block_id, index)


def adapter_model_patcher(adapter: SuTIAdapter) -> comfy.model_patcher.ModelPatcher:
    """Wrap an adapter so ComfyUI's model management loads and offloads it with the UNet."""
    return comfy.model_patcher.ModelPatcher(
        adapter,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
