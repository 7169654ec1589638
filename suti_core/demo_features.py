"""Bookkeeping for demonstration ("neighbor") features: block keys, recording, block map."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

MAX_DEMOS = 16
_BLOCK_PREFIX = {"input": "input_blocks.{id}.1", "middle": "middle_block.1", "output": "output_blocks.{id}.1"}
_BLOCK_KEY_RE = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<id>\d+)|(?P<middle>middle)_block)\.1\.transformer_blocks\.(?P<index>\d+)$"
)


def block_key(block_name: str, block_id: int, block_index: int) -> str:
    """LDM module path of a transformer block from ComfyUI's (name, id) block + block_index."""
    if block_name not in _BLOCK_PREFIX:
        raise ValueError(f"unknown block name {block_name!r}; expected one of {sorted(_BLOCK_PREFIX)}")
    return f"{_BLOCK_PREFIX[block_name].format(id=block_id)}.transformer_blocks.{block_index}"


def parse_block_key(key: str) -> tuple[str, int, int]:
    """Inverse of `block_key`: (block name, block id, block_index); the middle block has id 0."""
    match = _BLOCK_KEY_RE.match(key)
    if match is None:
        raise ValueError(
            f"not a transformer block key: {key!r} (expected e.g. 'input_blocks.1.1.transformer_blocks.0')"
        )
    name = match["kind"] or match["middle"]
    return name, int(match["id"] or 0), int(match["index"])


def build_block_map(blocks: Iterable[tuple[str, int]]) -> dict[str, str]:
    """Target block key -> source feature key, from (key, resolution level) in execution order.

    Down and middle blocks use their own features; an output block uses the features of the last
    down/middle block at its resolution. Output blocks with no such block are left out.
    """
    last_source_at_level: dict[int, str] = {}
    block_map: dict[str, str] = {}
    for key, level in blocks:
        if parse_block_key(key)[0] == "output":
            if level in last_source_at_level:
                block_map[key] = last_source_at_level[level]
        else:
            last_source_at_level[level] = key
            block_map[key] = key
    return block_map


@dataclass(frozen=True)
class Demonstration:
    """One demo: VAE latent (1, C, h, w), caption conditioning (1, T, D), pooled (1, P) or None."""

    latent: torch.Tensor
    conditioning: torch.Tensor
    pooled: torch.Tensor | None
    caption: str

    def __deepcopy__(self, memo: dict) -> Demonstration:
        return self  # immutable and shared on purpose: never copy the tensors


class FeatureRecorder:
    """Collects the normalised hidden states entering self-attention, per block key."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = frozenset(keys)
        self._chunks: dict[str, list[torch.Tensor]] = {}

    def record(self, key: str, hidden: torch.Tensor) -> None:
        """Store hidden (B, HW, C) of a block as B demos' tokens; other keys are ignored."""
        if key in self._keys:
            self._chunks.setdefault(key, []).append(hidden.detach().reshape(1, -1, hidden.shape[-1]))

    def features(self) -> dict[str, torch.Tensor]:
        """Per block key, all recorded demos concatenated along tokens: (1, n_demo*HW, C)."""
        missing = self._keys - self._chunks.keys()
        if missing:
            raise RuntimeError(f"no demo features were recorded for {len(missing)} blocks, e.g. {sorted(missing)[0]}")
        return {key: torch.cat(chunks, dim=1) for key, chunks in self._chunks.items()}


@dataclass(frozen=True)
class DemoFeatures:
    """Read-only neighbor features of one sampling run, keyed by source block key."""

    by_key: Mapping[str, torch.Tensor]

    def for_block(self, key: str, block_map: Mapping[str, str]) -> torch.Tensor | None:
        """Neighbor features (1, M, Cn) for a target block, or None when it has no source."""
        source = block_map.get(key)
        return None if source is None else self.by_key.get(source)

    def __deepcopy__(self, memo: dict) -> DemoFeatures:
        return self  # immutable and shared on purpose: never copy the tensors


BLOCK_GROUPS = ("input", "middle", "output")


def parse_block_weights(text: str, max_weight: float = 2.0) -> dict[str, float]:
    """Per-group weights from 'input:1.0, middle:1.0, output:0.5'; unnamed groups keep 1.0."""
    weights = dict.fromkeys(BLOCK_GROUPS, 1.0)
    for item in filter(None, (part.strip() for part in text.replace("\n", ",").split(","))):
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in weights:
            raise ValueError(
                f"block_weights entry {item!r} is not 'group:weight' with group one of {', '.join(BLOCK_GROUPS)} "
                "(example: 'input:1.0,middle:1.0,output:0.5')"
            )
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"block_weights entry {item!r}: {value.strip()!r} is not a number") from None
        if not 0.0 <= weight <= max_weight:
            raise ValueError(f"block_weights entry {item!r}: weight must be between 0 and {max_weight:g}")
        weights[name] = weight
    return weights
