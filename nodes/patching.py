"""Installing SuTI on a ModelPatcher clone: the per-run demo encoding, adapter or training-free patches and
texture transfer."""

from __future__ import annotations

import comfy.model_patcher
import comfy.patcher_extension

from ..suti_core.demo_features import parse_block_key
from .adapter_patch import NeighborResidualPatch, PassPrompt
from .demo_encoding import EncodeDemosEveryStep, EncodeDemosOncePerRun
from .layout import ModelLayout
from .settings import SuTISettings
from .texture import NoteSubjectCorrespondence, StartSubjectMap, TextureTransfer
from .training_free import CheckReplacesKept, ReferenceBlendReplace, ReferenceKeysPatch, attn1_replace_of


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
            comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
            settings.features_key,
            EncodeDemosEveryStep(settings, adapter_patcher),
        )
    else:
        clone.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE,
            settings.features_key,
            EncodeDemosOncePerRun(settings, adapter_patcher),
        )
    if settings.texture != 0.0:
        clone.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.PREDICT_NOISE, settings.features_key, StartSubjectMap(settings)
        )
        clone.set_model_sampler_post_cfg_function(TextureTransfer(settings))
        clone.set_model_attn1_patch(NoteSubjectCorrespondence(settings))
    if adapter_patcher is not None:
        clone.set_model_patch(NeighborResidualPatch(adapter_patcher, settings), "middle_patch")
        if adapter_patcher.model.metadata.reads_prompt:
            clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, settings.features_key,
                                       PassPrompt())
        return
    clone.set_model_attn1_patch(ReferenceKeysPatch(settings))
    install_blend_replaces(clone, layout, settings)


def install_blend_replaces(
    clone: comfy.model_patcher.ModelPatcher, layout: ModelLayout, settings: SuTISettings
) -> None:
    """Wrap each equal-width block's attn1 replace (SAG's, an earlier apply's) in this apply's blend, and check
    before sampling that no later node dropped it."""
    transformer_options = clone.model_options.get("transformer_options", {})
    replaces = {}
    for spec in layout.blocks:
        block = parse_block_key(spec.key)
        if spec.query_dim == spec.neighbor_dim and settings.group_weights[block[0]] != 0.0:
            replaces[block] = ReferenceBlendReplace(settings, attn1_replace_of(transformer_options, block))
            clone.set_model_attn1_replace(replaces[block], *block)
    clone.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, settings.features_key, CheckReplacesKept(replaces)
    )
