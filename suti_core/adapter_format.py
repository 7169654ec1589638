"""SuTI adapter file format: safetensors tensors + string metadata describing the base model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
ARCHITECTURES = frozenset({"sd1", "sd2", "sdxl", "toy", "custom"})
_METADATA_KEY = "suti.adapter"


class AdapterFileError(ValueError):
    """An adapter file is missing, unreadable or inconsistent; the message says what to do."""


class AdapterMismatchError(ValueError):
    """An adapter was made for another base model than the one it is applied to."""


@dataclass(frozen=True)
class BlockSpec:
    """One patched transformer block: its key, dims and the feature key its neighbors come from."""

    key: str
    query_dim: int
    neighbor_dim: int
    heads: int
    dim_head: int
    source_key: str


@dataclass(frozen=True)
class AdapterMetadata:
    """What an adapter was made for: format version, base architecture, text context width, blocks."""

    format_version: int
    architecture: str
    context_dim: int
    blocks: tuple[BlockSpec, ...]

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {sorted(ARCHITECTURES)}")

    @property
    def block_map(self) -> dict[str, str]:
        """Target block key -> source feature key."""
        return {b.key: b.source_key for b in self.blocks}

    def describe(self) -> str:
        return f"{self.architecture} (context {self.context_dim}, {len(self.blocks)} blocks)"

    def to_strings(self) -> dict[str, str]:
        """Safetensors metadata (string -> string)."""
        return {_METADATA_KEY: json.dumps(asdict(self), sort_keys=True), "format": "pt"}

    @classmethod
    def from_strings(cls, strings: Mapping[str, str] | None, source: str) -> AdapterMetadata:
        """Parse safetensors metadata; `source` names the file in error messages."""
        if not strings or _METADATA_KEY not in strings:
            raise AdapterFileError(
                f"{source} has no SuTI metadata ('{_METADATA_KEY}'); it is not a SuTI adapter. "
                "Use a file written by the SuTI trainer (save_adapter)."
            )
        try:
            raw = json.loads(strings[_METADATA_KEY])
            version = int(raw["format_version"])
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed(source, e) from e
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise AdapterFileError(
                f"{source} uses adapter format version {version}; this ComfyUI-SuTI reads versions "
                f"{sorted(SUPPORTED_FORMAT_VERSIONS)}. Update ComfyUI-SuTI or re-export the adapter."
            )
        try:
            blocks = tuple(BlockSpec(**b) for b in raw["blocks"])
            return cls(version, str(raw["architecture"]), int(raw["context_dim"]), blocks)
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed(source, e) from e


def _malformed(source: str, error: Exception) -> AdapterFileError:
    return AdapterFileError(f"{source} has malformed SuTI metadata ({error}); re-export the adapter.")


def check_adapter_matches_model(
    metadata: AdapterMetadata, model_architecture: str, model_context_dim: int, model_blocks: Sequence[BlockSpec]
) -> None:
    """Raise AdapterMismatchError naming the first difference between adapter and model."""
    model = f"{model_architecture} (context {model_context_dim}, {len(model_blocks)} blocks)"
    fix = "load an adapter made for this base model, or use 'none (training-free)'"
    if metadata.architecture != model_architecture or metadata.context_dim != model_context_dim:
        raise AdapterMismatchError(f"adapter was trained for {metadata.describe()} but the model is {model}; {fix}")
    by_key = {b.key: b for b in model_blocks}
    missing = [b.key for b in metadata.blocks if b.key not in by_key]
    if missing or len(by_key) != len(metadata.blocks):
        raise AdapterMismatchError(
            f"adapter blocks do not match the model's transformer blocks: adapter {metadata.describe()}, "
            f"model {model}" + (f", e.g. {missing[0]} is not in the model" if missing else "") + f"; {fix}"
        )
    for spec in metadata.blocks:
        found = by_key[spec.key]
        if (spec.query_dim, spec.neighbor_dim, spec.source_key) != (
            found.query_dim,
            found.neighbor_dim,
            found.source_key,
        ):
            raise AdapterMismatchError(
                f"block {spec.key}: adapter expects query_dim {spec.query_dim}, neighbor_dim {spec.neighbor_dim}, "
                f"neighbors from {spec.source_key}; the model has query_dim {found.query_dim}, neighbor_dim "
                f"{found.neighbor_dim}, neighbors from {found.source_key}; {fix}"
            )
