"""SuTI Apply's texture transfer in ComfyUI: the subject map its patches note, and the post-CFG step that moves
the denoised latent (the rule: suti_core/texture_transfer.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..suti_core.demo_features import Demonstration
from ..suti_core.texture_transfer import PatchBank, patch_bank, step_strength, subject_gate, transfer_texture
from .layout import key_of
from .settings import SharedReadOnly, SuTISettings

TEXTURE_START = 0.5  # sampling progress from which texture transfer acts: the pattern is committed in the last half


class SubjectMap:
    """Per run: the size of SuTI's term per token on the cond rows of one step's main pass, summed over the blocks
    at the latent's own resolution. `start` opens each step (StartSubjectMap); a block seen twice in a step is an
    extra pass (SAG's, PAG's, ...) and is not noted; a step `start`ed with `noting` False (before texture transfer
    acts) notes nothing; the step's post-CFG `take`s the map."""

    def __init__(self) -> None:
        self._norms: torch.Tensor | None = None
        self._blocks: set[str] = set()
        self._noting = True

    def start(self, noting: bool = True) -> None:
        self._norms, self._blocks, self._noting = None, set(), noting

    def record(self, term: torch.Tensor, extra_options: dict) -> None:
        if not self._noting:
            return
        grid = tuple(extra_options["activations_shape"][-2:])
        latent = extra_options.get("original_shape")
        chunks = extra_options.get("cond_or_uncond") or [0]
        block = key_of(extra_options)
        if latent is None or tuple(latent[-2:]) != grid or 0 not in chunks or block in self._blocks:
            return  # a coarser block, an area cond's crop, a pass without cond rows, or an extra pass
        self._blocks.add(block)
        cond_rows = term.detach().view(len(chunks), -1, *term.shape[1:])[chunks.index(0)]  # (B, N, C)
        norms = cond_rows.float().norm(dim=-1)  # (B, N)
        self._norms = norms if self._norms is None else self._norms + norms.to(self._norms.device)

    def take(self) -> torch.Tensor | None:
        """This step's map (B, N), or None when SuTI did not act on a cond row."""
        norms, self._norms = self._norms, None
        return norms


class StartSubjectMap(SharedReadOnly):
    """PREDICT_NOISE wrapper: each step's subject map starts empty, before any pass of that step, and notes only
    from TEXTURE_START on (the step's sigma is read once here, not in every block)."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, executor, x, timestep, model_options, seed):
        run = self.settings.run(model_options.get("transformer_options", {}))
        if run is not None and run.subject_map is not None:
            run.subject_map.start(noting=self.settings.texture_acts(float(timestep.max())))
        return executor(x, timestep, model_options, seed)


def next_sigma(transformer_options: dict, sigma: float) -> float | None:
    """The sigma the sampler steps to from `sigma` (its schedule, `sample_sigmas`; 0 after the last), or None where
    the schedule is not given (then texture transfer pulls the denoised latent by its share itself)."""
    sigmas = transformer_options.get("sample_sigmas")
    if sigmas is None:
        return None
    sigmas = sigmas.float().cpu()  # one copy from the device, read twice
    at = int((sigmas - sigma).abs().argmin())
    return float(sigmas[at + 1]) if at + 1 < len(sigmas) else 0.0


def demo_patch_bank(base_model, demos: Sequence[Demonstration], device: torch.device) -> PatchBank | None:
    """The demos' subject patches in the model's latent space (as the sampler's denoised latents are)."""
    latents = [base_model.process_latent_in(demo.latent.to(device)) for demo in demos]
    return patch_bank(latents, [demo.mask for demo in demos])


class TextureTransfer(SharedReadOnly):
    """sampler_post_cfg_function: from TEXTURE_START on, the subject cells (where this run's subject map marks
    them) of each step's next latent move `texture` of the way to their nearest demo patch's centre
    (`step_strength`)."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        options = args["model_options"].get("transformer_options", {})
        run = self.settings.run(options)
        if run is None or run.subject_map is None:
            return denoised
        norms = run.subject_map.take()
        sigma = float(args["sigma"].max())
        acts = self.settings.texture_acts(sigma)
        if not acts or norms is None or run.bank is None or norms.shape[0] != denoised.shape[0]:
            return denoised
        gate = subject_gate(norms, tuple(denoised.shape[-2:])).to(denoised.device)
        strength = step_strength(self.settings.texture, sigma, next_sigma(options, sigma))
        return transfer_texture(denoised, run.bank, gate, strength)
