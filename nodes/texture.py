"""SuTI Apply's texture transfer in ComfyUI: the subject map its patches note, and the post-CFG step that moves
the denoised latent (the rules: suti_core/texture_transfer.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..suti_core.demo_features import Demonstration, halved_grid
from ..suti_core.texture_transfer import (
    PatchBank,
    correspondence_gate,
    patch_bank,
    step_strength,
    subject_gate,
    subject_votes,
    transfer_texture,
)
from .layout import key_of
from .settings import SharedReadOnly, SuTISettings

TEXTURE_START = 0.5  # sampling progress from which texture transfer acts: the pattern is committed in the last half


class SubjectMap:
    """Per run: where the subject is in one step's main pass, from the cond rows of the blocks at the finest
    resolution the model's transformer blocks reach (`level` halvings below the latent's size: 0, or 1 for SDXL,
    whose gate is then stretched to the latent). With demo subject masks (`by_correspondence`) each such block
    adds its `subject_votes` (NoteSubjectCorrespondence); without, the size of SuTI's term per token (`record`).
    `start` opens each step (StartSubjectMap); a block seen twice in a step is an extra pass (SAG's, PAG's, ...)
    and is not noted; a step `start`ed with `noting` False (before texture transfer acts) notes nothing; the
    step's post-CFG `take`s the gate."""

    def __init__(self, by_correspondence: bool = False, level: int = 0) -> None:
        self.by_correspondence, self.level = by_correspondence, level
        self._scores: torch.Tensor | None = None
        self._grid: tuple[int, int] | None = None
        self._blocks: set[str] = set()
        self._noting = True

    @property
    def noting(self) -> bool:
        """Whether this step is noted at all (texture transfer acts on it)."""
        return self._noting

    def start(self, noting: bool = True) -> None:
        self._scores, self._blocks, self._noting = None, set(), noting

    def record(self, term: torch.Tensor, extra_options: dict) -> None:
        """Note a block's SuTI term (B, N, C) by its size per token (without demo masks)."""
        rows = None if self.by_correspondence else self._cond_rows(term, extra_options)
        if rows is not None:
            self._add(rows.float().norm(dim=-1))

    def record_votes(self, hidden: torch.Tensor, tokens: torch.Tensor, subject: torch.Tensor,
                     extra_options: dict) -> None:
        """Note a block's self-attention input (B, N, C) by its votes against the demos' tokens (1, M, C) and
        their subject mask (1, M) (with demo masks)."""
        rows = self._cond_rows(hidden, extra_options) if self.by_correspondence else None
        votes = None if rows is None else subject_votes(rows, tokens, subject)
        if votes is not None:
            self._add(votes)

    def take(self, latent_grid: tuple[int, int]) -> torch.Tensor | None:
        """This step's gate (B, 1, *latent_grid), or None when nothing was noted."""
        scores, self._scores = self._scores, None
        if scores is None:
            return None
        gate = correspondence_gate(scores, self._grid) if self.by_correspondence else subject_gate(scores, self._grid)
        return gate if self._grid == latent_grid else F.interpolate(gate, size=latent_grid, mode="nearest")

    def _cond_rows(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor | None:
        """x's cond rows (B, N, C) when this block is noted: a main-pass block at the map's resolution, seen first
        this step, in a pass with cond rows; else None."""
        if not self._noting:
            return None
        grid = tuple(extra_options["activations_shape"][-2:])
        latent = extra_options.get("original_shape")
        chunks = extra_options.get("cond_or_uncond") or [0]
        block = key_of(extra_options)
        at_map = latent is not None and halved_grid(tuple(latent[-2:]), self.level) == grid
        if not at_map or 0 not in chunks or block in self._blocks:
            return None  # another resolution, an area cond's crop, a pass without cond rows, or an extra pass
        self._blocks.add(block)
        self._grid = grid
        return x.detach().view(len(chunks), -1, *x.shape[1:])[chunks.index(0)]

    def _add(self, scores: torch.Tensor) -> None:
        self._scores = scores if self._scores is None else self._scores + scores.to(self._scores.device)


class NoteSubjectCorrespondence(SharedReadOnly):
    """attn1_patch: hands the subject map each block's self-attention input (norm1(x), what the demo features
    are) with the demos' tokens of its source, where SuTI acts on that block this step, inside its region."""

    def __init__(self, settings: SuTISettings) -> None:
        self.settings = settings

    def __call__(self, n: torch.Tensor, context, value, extra_options: dict):
        run = self.settings.run(extra_options)
        if run is None or run.subject_map is None or not (run.subject_map.by_correspondence and run.subject_map.noting):
            return n, context, value  # before texture transfer acts: no lookup, no read of the step's sigma
        key = key_of(extra_options)
        tokens = run.features.for_block(key, self.settings.block_map)
        subject = run.features.mask_for_block(key, self.settings.block_map)
        if (tokens is None or subject is None or tokens.shape[-1] != n.shape[-1]
                or self.settings.row_weights(key, n, extra_options) is None):
            return n, context, value
        hidden = n
        if self.settings.region is not None:  # outside the region a token votes 0: not the subject
            hidden = torch.where(self.settings.region.token_weights(n, extra_options) > 0, n, torch.zeros_like(n))
        run.subject_map.record_votes(hidden, tokens, subject, extra_options)
        return n, context, value


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
        gate = run.subject_map.take(tuple(denoised.shape[-2:]))
        sigma = float(args["sigma"].max())
        acts = self.settings.texture_acts(sigma)
        if not acts or gate is None or run.bank is None or gate.shape[0] != denoised.shape[0]:
            return denoised
        gate = gate.to(denoised.device)
        strength = step_strength(self.settings.texture, sigma, next_sigma(options, sigma))
        return transfer_texture(denoised, run.bank, gate, strength)
