"""Bookkeeping for demonstration ("neighbor") features: block keys, recording, block map."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter_format import BlockSpec

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


FEATURE_SOURCES = ("encoder", "encoder+decoder")  # where demo features come from (SuTI: encoder; DreamCache: +decoder)
MAX_TOKENS_PER_DEMO = 1024  # above this a demo's block features are 2x2 average-pooled (SD1.5 at 512²: 64x64 -> 32x32)


def check_feature_source(source: str) -> str:
    """`source` if it is one of FEATURE_SOURCES, else a ValueError listing them."""
    if source not in FEATURE_SOURCES:
        raise ValueError(f"demo feature source {source!r} is not one of {', '.join(FEATURE_SOURCES)}")
    return source


def build_block_map(blocks: Iterable[tuple[str, int]], source: str = "encoder") -> dict[str, str]:
    """Target block key -> source feature key, from (key, resolution level) in execution order.

    `encoder` (SuTI / Re-Imagen): down and middle blocks use their own features; an output block uses the
    features of the last down/middle block at its resolution (left out when there is none).
    `encoder+decoder` (DreamCache): every block uses its own features, so demos run through the whole UNet.
    """
    check_feature_source(source)
    last_source_at_level: dict[int, str] = {}
    block_map: dict[str, str] = {}
    for key, level in blocks:
        if source == "encoder+decoder" or parse_block_key(key)[0] != "output":
            last_source_at_level[level] = key
            block_map[key] = key
        elif level in last_source_at_level:
            block_map[key] = last_source_at_level[level]
    return block_map


def feature_source_of(block_map: Mapping[str, str]) -> str:
    """The source whose block map this is: `encoder+decoder` when any output block reads its own features."""
    decoder = any(parse_block_key(k)[0] == "output" and k == v for k, v in block_map.items())
    return "encoder+decoder" if decoder else "encoder"


def needs_decoder(source_keys: Iterable[str]) -> bool:
    """Whether demo encoding must run past the middle block (some source is an output block)."""
    return any(parse_block_key(key)[0] == "output" for key in source_keys)


def finest_level(blocks: Iterable[tuple]) -> int:
    """The finest resolution level (key, level, ...) transformer blocks reach: 0 where some block sits at the latent's
    own size (SD1.x, SD2.x), 1 for SDXL, whose first level has none."""
    return min(level for _, level, *_ in blocks)


def block_specs(blocks: Iterable[tuple[str, int, int, int, int]], source: str = "encoder",
                finest_heads: int = 0) -> tuple[BlockSpec, ...]:
    """BlockSpecs from (key, level, width, heads, dim_head) in execution order: what a host's UNet offers SuTI.
    `finest_heads` > 0 gives the neighbor attention of the finest level's blocks, where a texture's phase lives,
    that many heads of the block's dim_head instead of the block's own (a wider adapter there, not a wider UNet)."""
    blocks = list(blocks)
    block_map = build_block_map(((key, level) for key, level, *_ in blocks), source)
    width = {key: dim for key, _, dim, _, _ in blocks}
    finest = finest_level(blocks) if blocks else 0
    return tuple(BlockSpec(key, dim, width[block_map[key]], finest_heads if finest_heads and level == finest else heads,
                           dim_head, block_map[key])
                 for key, level, dim, heads, dim_head in blocks if key in block_map)


def halved_grid(grid: tuple[int, int], times: int = 1) -> tuple[int, int]:
    """A grid halved `times` times, odd sides rounding up (as the UNet's stride-2 downsampling and 2x2 pooling)."""
    h, w = grid
    for _ in range(times):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def pooled_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """The token grid a demo keeps at a block of `grid`: halved until <= MAX_TOKENS_PER_DEMO."""
    while grid[0] * grid[1] > MAX_TOKENS_PER_DEMO:
        grid = halved_grid(grid)
    return tuple(grid)


def pool_demo_tokens(hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) block features of B demos -> (B, h'*w', C) on `pooled_grid` (average pooling)."""
    target = pooled_grid(grid)
    if target == tuple(grid):
        return hidden
    b, _, c = hidden.shape
    spatial = hidden.transpose(1, 2).reshape(b, c, *grid)  # (B, C, h, w)
    return F.adaptive_avg_pool2d(spatial, target).flatten(2).transpose(1, 2)  # (B, h'*w', C)


def demo_token_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(h'*w',) bool: the tokens of a demo at a block of `grid` that touch its subject mask (H, W) in [0, 1]."""
    target = pooled_grid(grid)
    cells = F.adaptive_max_pool2d(mask[None, None].float(), target)  # (1, 1, h', w')
    return cells.flatten() > 0.5


@dataclass(frozen=True)
class Demonstration:
    """One demo: VAE latent (1, C, h, w), caption conditioning (1, T, D), pooled (1, P) or None, an optional
    subject mask (H, W) in [0, 1] (None: every token of the demo is a neighbor) and its weight (`demo_logit_biases`)."""

    latent: torch.Tensor
    conditioning: torch.Tensor
    pooled: torch.Tensor | None
    caption: str
    mask: torch.Tensor | None = None
    weight: float = 1.0

    def __deepcopy__(self, memo: dict) -> Demonstration:
        return self  # immutable and shared on purpose: never copy the tensors


def parse_demo_weights(text: str, count: int) -> tuple[float, ...]:
    """One non-negative weight per demo from '1, 0.5, 1' (commas or new lines); empty: all 1."""
    items = [part.strip() for part in text.replace("\n", ",").split(",")]
    if not any(items):
        return (1.0,) * count
    if len(items) != count or not all(items):
        found = len([i for i in items if i])
        raise ValueError(f"got {count} demo images but {found} demo_weights; give one weight per image, in batch "
                         f"order (e.g. '{', '.join(['1'] * count)}'), or leave demo_weights empty")
    weights = []
    for number, item in enumerate(items, start=1):
        try:
            weight = float(item)
        except ValueError:
            raise ValueError(f"demo_weights entry {number} ({item!r}) is not a number") from None
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"demo_weights entry {number} ({item!r}) must be a number >= 0 (0 leaves the demo out)")
        weights.append(weight)
    if not any(weights):
        raise ValueError(
            "every demo_weights entry is 0, which leaves out every demo; give at least one demo a weight > 0"
        )
    return tuple(weights)


def kept_demos(demos: Iterable[Demonstration]) -> tuple[Demonstration, ...]:
    """The demos that count: weight 0 leaves a demo out of the neighbors exactly (and saves its encoding)."""
    return tuple(demo for demo in demos if demo.weight > 0.0)


def demo_logit_biases(weights: Sequence[float]) -> tuple[float, ...] | None:
    """Per-demo attention logit bias log(w_d / max w) for weights > 0, added to every token of demo d: a prior
    that scales demo d's attention share by w_d before renormalisation. None when all weights are equal."""
    if any(w <= 0.0 for w in weights):
        raise ValueError(f"demo weights must be > 0 here (drop weight-0 demos with kept_demos), got {list(weights)}")
    if len(set(weights)) <= 1:
        return None
    top = max(weights)
    return tuple(math.log(w / top) for w in weights)


class FeatureRecorder:
    """Collects the normalised hidden states entering self-attention per block key, demo by demo, with the
    token masks of the demos' subjects (pooled to at most MAX_TOKENS_PER_DEMO tokens per demo) and each token's
    logit bias (its demo's `demo_logit_biases` entry)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = frozenset(keys)
        self._chunks: dict[str, list[torch.Tensor]] = {}
        self._masks: dict[str, list[torch.Tensor]] = {}
        self._biases: dict[str, list[torch.Tensor]] = {}

    def record(self, key: str, hidden: torch.Tensor, grid: tuple[int, int],
               masks: Sequence[torch.Tensor | None] | None = None, biases: Sequence[float] | None = None) -> None:
        """Store hidden (B, h*w, C) of a block as B demos' tokens, with each demo's subject mask (H, W) or None
        and logit bias (None: 0 for all); other keys are ignored."""
        if key not in self._keys:
            return
        tokens = pool_demo_tokens(hidden.detach(), grid)  # (B, t, C)
        self._chunks.setdefault(key, []).append(tokens)
        masks = masks if masks is not None else [None] * hidden.shape[0]
        self._masks.setdefault(key, []).append(torch.stack([
            torch.ones(tokens.shape[1], dtype=torch.bool) if m is None else demo_token_mask(m, grid).cpu()
            for m in masks]).to(tokens.device))  # (B, t)
        biases = biases if biases is not None else [0.0] * hidden.shape[0]
        self._biases.setdefault(key, []).append(
            torch.tensor(biases, dtype=torch.float32, device=tokens.device)[:, None].expand(-1, tokens.shape[1]))

    def features(self, groups: int = 1) -> DemoFeatures:
        """The recorded demos as `groups` equal groups in recording order (one per training sample; one for a
        sampling run, where demos may differ in size): per block key (groups, n_demo*t, C), masks and biases
        (groups, n_demo*t)."""
        missing = self._keys - self._chunks.keys()
        if missing:
            raise RuntimeError(f"no demo features were recorded for {len(missing)} blocks, e.g. {sorted(missing)[0]}")

        def grouped(chunks: list[torch.Tensor]) -> torch.Tensor:
            if groups == 1:
                return torch.cat([c.reshape(1, -1, *c.shape[2:]) for c in chunks], dim=1)
            joined = torch.cat(chunks)  # (D, t, ...)
            return joined.reshape(groups, -1, *joined.shape[2:])

        masks = {key: grouped(m) for key, m in self._masks.items()}
        biases = {key: grouped(b) for key, b in self._biases.items()}
        return DemoFeatures({key: grouped(chunks) for key, chunks in self._chunks.items()},
                            None if all(bool(m.all()) for m in masks.values()) else masks,
                            None if all(not bool(b.any()) for b in biases.values()) else biases)


@dataclass(frozen=True)
class DemoFeatures:
    """Read-only neighbor features of one sampling run, keyed by source block key, with the subject token
    masks (1, M) bool when any demo had a mask (None: every token is a neighbor) and the tokens' logit biases
    (1, M) float when demo weights differ (None: no bias)."""

    by_key: Mapping[str, torch.Tensor]
    masks: Mapping[str, torch.Tensor] | None = None
    biases: Mapping[str, torch.Tensor] | None = None

    def for_block(self, key: str, block_map: Mapping[str, str]) -> torch.Tensor | None:
        """Neighbor features (1, M, Cn) for a target block, or None when it has no source."""
        source = block_map.get(key)
        return None if source is None else self.by_key.get(source)

    def mask_for_block(self, key: str, block_map: Mapping[str, str]) -> torch.Tensor | None:
        """The neighbor mask (1, M) bool for a target block, or None when every token counts."""
        return None if self.masks is None else self.masks.get(block_map.get(key))

    def subject_neighbors(
        self, key: str, block_map: Mapping[str, str]
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A sampling run's neighbors (1, M', Cn) for a target block with the tokens outside the subject masks
        dropped (what masking them does, at the cost of the subject's tokens only) and their logit biases (1, M')
        or None; None when the block has no source or no subject token."""
        neighbors = self.for_block(key, block_map)
        if neighbors is None:
            return None
        if neighbors.shape[0] != 1:
            raise ValueError(f"subject tokens are per sampling run (1 group), got {neighbors.shape[0]} groups")
        bias = None if self.biases is None else self.biases.get(block_map.get(key))
        mask = self.mask_for_block(key, block_map)
        if mask is not None:
            keep = mask[0].to(neighbors.device)
            neighbors, bias = neighbors[:, keep], None if bias is None else bias[:, keep.to(bias.device)]
        return (neighbors, bias) if neighbors.shape[1] else None

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
