"""One SuTI Apply's settings, shared read-only by its patches and wrappers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..suti_core.demo_features import DemoFeatures, Demonstration, parse_block_key

if TYPE_CHECKING:
    from ..suti_core.texture_transfer import PatchBank
    from .regions import RegionMask
    from .texture import SubjectMap


class SharedReadOnly:
    """Patch objects are immutable: ModelPatcher.clone()'s deepcopy shares them instead of copying tensors."""

    def __deepcopy__(self, memo: dict) -> SharedReadOnly:
        return self


@dataclass(frozen=True)
class SuTISettings:
    """One SuTI Apply: demos, strength, sigma range, per-group weights, the block map and its region mask."""

    features_key: str  # where this apply's features live in transformer_options
    demos: tuple[Demonstration, ...]
    source_keys: frozenset[str]
    block_map: Mapping[str, str]
    strength: float
    sigma_start: float
    sigma_end: float
    group_weights: Mapping[str, float]
    cond_only: bool
    region: RegionMask | None = None  # attn_mask: where in the image this apply acts (None: everywhere)
    texture: float = 0.0              # texture transfer's share (suti_core.texture_transfer; 0: off)
    texture_sigma: float = 0.0        # it acts at sigmas up to this one
    texture_level: int = 0            # its subject map reads the blocks this many halvings below the latent's size

    def texture_acts(self, sigma: float) -> bool:
        """Whether texture transfer acts at this step's sigma (from TEXTURE_START on)."""
        return sigma <= self.texture_sigma

    def row_weights(self, key: str, x: torch.Tensor, extra_options: dict) -> torch.Tensor | None:
        """Per-row weight (B,) of the SuTI term for block `key` (on the CPU: choosing rows never waits for the
        GPU), or None when it is off for every row."""
        sigma = float(extra_options["sigmas"].max())
        weight = self.strength * self.group_weights[parse_block_key(key)[0]]
        if weight == 0.0 or not self.sigma_end <= sigma <= self.sigma_start:
            return None
        chunks = extra_options.get("cond_or_uncond") or [0]
        rows = [0.0 if (self.cond_only and c != 0) else weight for c in chunks]  # 1 uncond, 2 PerpNeg's empty
        if not any(rows):
            return None
        per_chunk = x.shape[0] // len(chunks)
        return torch.tensor(rows, dtype=x.dtype).repeat_interleave(per_chunk)

    def place(self, term: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """A block's SuTI term (B, N, C) times this apply's region mask per token (the rule: regions.py), noted
        in the run's subject map (which notes only the steps texture transfer acts on)."""
        placed = term if self.region is None else term * self.region.token_weights(term, extra_options)
        run = self.run(extra_options)
        if run is not None and run.subject_map is not None:
            run.subject_map.record(placed, extra_options)
        return placed

    def run(self, extra_options: dict) -> RunNeighbors | None:
        """This run's neighbors (set by the encoding wrapper), or None outside a SuTI run."""
        return extra_options.get(self.features_key)


@dataclass(frozen=True)
class RunNeighbors:
    """A run's demo features, each block's neighbors (the subject's tokens (1, M, C) and their logit biases
    (1, M) or None: `DemoFeatures.subject_neighbors`, taken once per run), with an adapter their keys/values
    projected once per run, and with texture transfer the demos' patch bank and this run's subject map."""

    features: DemoFeatures
    neighbors: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]
    kv: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    bank: PatchBank | None = None
    subject_map: SubjectMap | None = None

    def __deepcopy__(self, memo: dict) -> RunNeighbors:
        return self
