"""SuTI Apply: patch a clone of MODEL so every transformer block attends to the demos."""

from __future__ import annotations

import uuid

from comfy_api.latest import io

from ..suti_core.adapter_format import AdapterMismatchError
from ..suti_core.demo_features import feature_source_of, kept_demos, parse_block_weights
from .adapter_patch import adapter_in_dtype
from .demos import DemosType
from .feature_labels import DEFAULT_FEATURES, FEATURES, LABEL_OF_SOURCE
from .layout import ModelLayout, check_adapter_for_model, describe_model
from .loaders import AdapterType
from .patching import install_suti
from .regions import RegionMask, region_mask
from .settings import SuTISettings
from .texture import TEXTURE_START

MAX_STRENGTH = 2.0
DEFAULT_TEXTURE = 0.35  # chosen on validation subjects by the render filter (README, seventh, eighth and tenth sessions)
ENCODE_ONCE, ENCODE_EVERY_STEP = "once", "every step"
BOTH, COND_ONLY = "cond and uncond", "cond only"


def check_settings(
    strength: float | None, start_percent: float | None, end_percent: float | None, block_weights: str | None,
    texture_transfer: float | None = None,
) -> str | None:
    """The first problem with the numeric settings as a sentence, or None."""
    if strength is not None and not 0.0 <= strength <= MAX_STRENGTH:
        return f"strength {strength} is outside 0..{MAX_STRENGTH:g}: use 0 (off) to 1 (full SuTI effect); up to {MAX_STRENGTH:g} exaggerates it"
    if texture_transfer is not None and not 0.0 <= texture_transfer <= 1.0:
        return f"texture_transfer {texture_transfer} is outside 0..1: use 0 (off) to 1 (the demo patches replace the subject's cells)"
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if value is not None and not 0.0 <= value <= 1.0:
            return f"{name} {value} must be between 0 and 1"
    if start_percent is not None and end_percent is not None and start_percent > end_percent:
        return (
            f"start_percent {start_percent} is after end_percent {end_percent}: SuTI would never run; make start <= end"
        )
    return check_block_weights(block_weights)


def check_block_weights(block_weights: str | None) -> str | None:
    """The problem with `block_weights` as a sentence, or None."""
    if block_weights:
        try:
            parse_block_weights(block_weights, MAX_STRENGTH)
        except ValueError as e:
            return str(e)
    return None


def check_demos_fit_model(demos: tuple, layout: ModelLayout) -> None:
    """ValueError naming the first demo whose caption another CLIP encoded (chained Demonstrations may mix them)."""
    if not demos:
        raise ValueError("no demos: connect a SuTI Demonstrations node")
    for number, demo in enumerate(demos, 1):
        width = demo.conditioning.shape[-1]
        if width != layout.context_dim:
            raise ValueError(
                f"demo {number} of {len(demos)} ({demo.caption!r}): its caption was encoded by a text encoder of "
                f"width {width}, but the model expects {layout.context_dim} ({layout.architecture}); connect this "
                "checkpoint's CLIP to the SuTI Demonstrations node that made it"
            )


def check_adapter_features(adapter, demo_features: str) -> None:
    """The adapter reads demo features from the blocks it was trained with: say which setting that is."""
    trained = feature_source_of(adapter.metadata.block_map)
    if trained != FEATURES[demo_features]:
        raise AdapterMismatchError(
            f"the adapter was trained on '{LABEL_OF_SOURCE[trained]}' demo features but demo_features is "
            f"'{demo_features}'; set demo_features to '{LABEL_OF_SOURCE[trained]}'"
        )


def compute_dtype(model):
    """The dtype the UNet computes in (its manual-cast dtype for fp8 weights)."""
    base = model.model
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def build_settings(
    model,
    layout: ModelLayout,
    demos: tuple,
    strength: float,
    start_percent: float,
    end_percent: float,
    block_weights: str,
    apply_to: str,
    region: RegionMask | None,
    texture: float = 0.0,
) -> SuTISettings:
    sampling = model.get_model_object("model_sampling")
    return SuTISettings(
        features_key=f"suti_features_{uuid.uuid4().hex}",
        demos=kept_demos(demos),  # weight 0: out of the neighbors
        source_keys=layout.source_keys,
        block_map=layout.block_map,
        strength=strength,
        sigma_start=sampling.percent_to_sigma(start_percent),
        sigma_end=sampling.percent_to_sigma(end_percent),
        group_weights=parse_block_weights(block_weights, MAX_STRENGTH),
        cond_only=apply_to == COND_ONLY,
        region=region,
        texture=texture,
        texture_sigma=sampling.percent_to_sigma(TEXTURE_START),
        texture_level=layout.finest_level,
    )


class SuTIApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SuTIApply",
            display_name="SuTI Apply",
            category="SuTI",
            description="Subject-driven generation from demonstrations (SuTI): neighbor attention in every UNet transformer block.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The SD1.x / SD2.x / SDXL model to patch (a clone is patched; the input stays as it is).",
                ),
                DemosType.Input("demos", tooltip="Demonstrations from SuTI Demonstrations."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=MAX_STRENGTH,
                    step=0.01,
                    tooltip="0 = off, 1 = full SuTI effect; above 1 exaggerates it.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Sampling progress (0 = first step) where SuTI starts acting.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Sampling progress (1 = last step) where SuTI stops acting.",
                ),
                io.Combo.Input(
                    "demo_encoding",
                    options=[ENCODE_ONCE, ENCODE_EVERY_STEP],
                    default=ENCODE_ONCE,
                    tooltip="'once': demos go through the UNet's down blocks once per run at t≈0 (fast). "
                    "'every step': re-encoded at each step's noise level (slower; for comparison).",
                ),
                io.Combo.Input(
                    "apply_to",
                    options=[COND_ONLY, BOTH],
                    default=COND_ONLY,
                    tooltip="Demo guidance. 'cond only' (default): the negative prompt's pass stays plain, so CFG "
                    "pushes towards the subject as well as the prompt (the demo term would cancel in CFG otherwise); "
                    "strength then scales the subject's pull. 'cond and uncond': both passes see the demos.",
                ),
                io.Combo.Input(
                    "demo_features",
                    options=list(FEATURES),
                    default=DEFAULT_FEATURES,
                    tooltip="Which UNet blocks encode the demos. 'encoder (SuTI)': down and middle blocks, output "
                    "blocks reuse them. 'encoder + decoder': every block reads its own demo features (DreamCache). "
                    "An adapter works with the setting it was trained with.",
                ),
                AdapterType.Input(
                    "adapter",
                    optional=True,
                    tooltip="From SuTI Load Adapter; leave empty (or 'none') for training-free mode.",
                ),
                io.Mask.Input(
                    "attn_mask",
                    optional=True,
                    tooltip="Optional: where in the image this subject goes; white = apply, black = leave as is. "
                    "One mask for every image or one per latent batch image; stretched to the image. Chain two "
                    "SuTI Apply nodes with complementary masks to put two subjects in one image.",
                ),
                io.String.Input(
                    "block_weights",
                    optional=True,
                    default="",
                    tooltip="Optional per-part weights, e.g. 'input:1.0,middle:1.0,output:0.5' (each 0..2).",
                ),
                io.Float.Input(
                    "texture_transfer",
                    optional=True,
                    default=DEFAULT_TEXTURE,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Over the second half of sampling, each step moves the subject's latent this share of "
                    "the way to the demos' patches (only inside the subject; its outline and the background stay): "
                    "brings out fine patterns and colours. 0 = off. With subject masks on the demos the subject is "
                    "found by matching the UNet's features to the demos' subjects and backgrounds; without, from "
                    "where SuTI acts, which is coarser. Works best with an adapter and masks; training-free, "
                    "outlines move too (the training-free workflows set 0).",
                ),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, block_weights: str | None = None) -> bool | str:
        """block_weights only: ComfyUI marks every input named here with the message, and checks the numbers
        against the schema's min/max on their own inputs (execute reports start > end)."""
        return check_block_weights(block_weights) or True

    @classmethod
    def execute(
        cls,
        model,
        demos,
        strength: float,
        start_percent: float,
        end_percent: float,
        demo_encoding: str,
        apply_to: str,
        demo_features: str = DEFAULT_FEATURES,
        adapter=None,
        block_weights: str = "",
        attn_mask=None,
        texture_transfer: float = DEFAULT_TEXTURE,
    ) -> io.NodeOutput:
        problem = check_settings(strength, start_percent, end_percent, block_weights, texture_transfer)
        if problem:
            raise ValueError(problem)
        region = region_mask(attn_mask)
        layout = describe_model(model, FEATURES[demo_features])
        check_demos_fit_model(demos, layout)
        if adapter is not None:
            check_adapter_features(adapter.model, demo_features)
            check_adapter_for_model(adapter.model, layout)
            adapter = adapter_in_dtype(adapter, compute_dtype(model))
        patched = model.clone()
        if strength == 0.0:
            return io.NodeOutput(patched)  # off: no demo encoding, no patches
        settings = build_settings(
            model, layout, demos, strength, start_percent, end_percent, block_weights, apply_to, region,
            texture_transfer,
        )
        install_suti(patched, layout, settings, adapter, every_step=demo_encoding == ENCODE_EVERY_STEP)
        return io.NodeOutput(patched)
