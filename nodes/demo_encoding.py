"""Demo features per sampling run: the demos through the loaded UNet at t≈0 (once) or at each step's sigma."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..suti_core.demo_features import (
    DemoFeatures,
    Demonstration,
    FeatureRecorder,
    demo_logit_biases,
    feature_source_of,
    needs_decoder,
)
from .feature_labels import LABEL_OF_SOURCE
from .layout import key_of
from .settings import RunNeighbors, SharedReadOnly, SuTISettings
from .texture import SubjectMap, demo_patch_bank


class _StopAtOutputBlocks(Exception):
    """Raised by the recorder's output_block_patch: encoder features need only the down and middle blocks."""


def _stop_at_output_blocks(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
    raise _StopAtOutputBlocks


class _FeatureRecorderPatch:
    """attn1_patch recording norm1(x) of every block (with the demo's subject mask and logit bias); returns its
    inputs unchanged."""

    def __init__(self, recorder: FeatureRecorder, mask: torch.Tensor | None, bias: float) -> None:
        self.recorder, self.mask, self.bias = recorder, mask, bias

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        grid = tuple(extra_options["activations_shape"][-2:])
        self.recorder.record(key_of(extra_options), n, grid, [self.mask], [self.bias])  # n: (1, h*w, C)
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
    base_model, demos: Sequence[Demonstration], source_keys: frozenset[str], sigma: torch.Tensor, device: torch.device,
    show_progress: bool = True,
) -> DemoFeatures:
    """Run every demo through the UNet at `sigma` (down and middle blocks only, unless a source is an output
    block); record norm1(x) per source block, with each demo's logit bias from its weight (all > 0).
    `show_progress` False leaves the node's progress bar to the sampler (a bar of its own would reset the
    sampler's at every step)."""
    recorder = FeatureRecorder(source_keys)
    stop = [] if needs_decoder(source_keys) else [_stop_at_output_blocks]
    progress = comfy.utils.ProgressBar(len(demos)) if show_progress else None
    biases = demo_logit_biases([demo.weight for demo in demos]) or [0.0] * len(demos)
    with torch.no_grad():
        for index, demo in enumerate(demos):
            comfy.model_management.throw_exception_if_processing_interrupted()
            options = {"patches": {"attn1_patch": [_FeatureRecorderPatch(recorder, demo.mask, biases[index])],
                                   "output_block_patch": stop}}
            x = _demo_input(base_model, demo, sigma, index, device)
            try:
                base_model.apply_model(
                    x, sigma.reshape(1).to(device), transformer_options=options, **_demo_conds(base_model, demo, x, device)
                )
            except _StopAtOutputBlocks:
                pass
            if progress is not None:
                progress.update(1)
    return recorder.features()


def project_neighbors(adapter_patcher: comfy.model_patcher.ModelPatcher | None, features: DemoFeatures,
                      block_map: dict[str, str]) -> RunNeighbors:
    """Every block's neighbors once per run (only the subject's tokens when demos carry masks, with their logit
    biases when demo weights differ), projected by the adapter (batch 1, adapter dtype/device) if there is one."""
    neighbors = {key: found for key in block_map if (found := features.subject_neighbors(key, block_map))}
    if adapter_patcher is None:
        return RunNeighbors(features, neighbors)
    kv = {}
    with torch.no_grad():
        for key, (tokens, _) in neighbors.items():
            module = adapter_patcher.model.block(key)
            kv[key] = module.neighbor_kv(tokens.to(module.to_out.weight))  # (1, M, H*D) each
    return RunNeighbors(features, neighbors, kv)


def encode_run(settings: SuTISettings, adapter_patcher: comfy.model_patcher.ModelPatcher | None, guider,
               sigma: torch.Tensor, show_progress: bool) -> RunNeighbors:
    """The demos through the guider's loaded model at `sigma`, then projected by the adapter (if any); with
    texture transfer also their patch bank and a fresh subject map."""
    device = guider.model_patcher.load_device
    features = encode_demo_features(guider.inner_model, settings.demos, settings.source_keys, sigma, device,
                                    show_progress)
    run = project_neighbors(adapter_patcher, features, settings.block_map)
    if settings.texture == 0.0:
        return run
    bank = demo_patch_bank(guider.inner_model, settings.demos, device)
    subject_map = SubjectMap(by_correspondence=features.masks is not None, level=settings.texture_level)
    return dataclasses.replace(run, bank=bank, subject_map=subject_map)


class EncodeDemosOncePerRun(SharedReadOnly):
    """SAMPLER_SAMPLE wrapper: encode demos with the loaded model (LoRA included) at t≈0, once per run."""

    def __init__(self, settings: SuTISettings, adapter_patcher: comfy.model_patcher.ModelPatcher | None) -> None:
        self.settings, self.adapter_patcher = settings, adapter_patcher

    def __call__(self, executor, guider, sigmas, extra_args, *args, **kwargs):
        sigma = torch.tensor(float(guider.inner_model.model_sampling.sigma_min))
        start = time.perf_counter()
        run = encode_run(self.settings, self.adapter_patcher, guider, sigma, show_progress=True)
        features = LABEL_OF_SOURCE[feature_source_of(self.settings.block_map)]
        logging.info("SuTI: encoded %d demos (demo_features '%s') in %.2f s", len(self.settings.demos), features,
                     time.perf_counter() - start)
        return executor(guider, sigmas, _with_run(extra_args, self.settings.features_key, run), *args, **kwargs)


class EncodeDemosEveryStep(SharedReadOnly):
    """PREDICT_NOISE wrapper: re-encode demos at each step's sigma (for benchmarks against 'once'); no progress
    bar or log line of its own, which would repeat at every step."""

    def __init__(self, settings: SuTISettings, adapter_patcher: comfy.model_patcher.ModelPatcher | None) -> None:
        self.settings, self.adapter_patcher = settings, adapter_patcher

    def __call__(self, executor, x, timestep, model_options, seed):
        run = encode_run(self.settings, self.adapter_patcher, executor.class_obj, timestep.max().cpu(),
                         show_progress=False)
        options = _with_run({"model_options": model_options}, self.settings.features_key, run)["model_options"]
        return executor(x, timestep, options, seed)


def _with_run(extra_args: dict, features_key: str, run: RunNeighbors) -> dict:
    """A copy of the run's extra_args whose transformer_options carry this run's neighbors."""
    model_options = extra_args["model_options"]
    transformer_options = {**model_options.get("transformer_options", {}), features_key: run}
    return {**extra_args, "model_options": {**model_options, "transformer_options": transformer_options}}
