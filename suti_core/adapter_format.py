"""SuTI adapter file format: safetensors tensors + string metadata describing the base model."""

from __future__ import annotations

import json
import reprlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

FORMAT_VERSION = 1
PROMPT_FORMAT_VERSION = 2  # version 1 whose blocks also attend to the prompt's tokens (`NeighborAttention`)
SUPPORTED_FORMAT_VERSIONS = frozenset({FORMAT_VERSION, PROMPT_FORMAT_VERSION})
ARCHITECTURES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "toy": "the toy base of SuTI Load Toy Base",
                 "custom": "a custom UNet"}  # the base models an adapter can be made for, as users know them
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
    def reads_prompt(self) -> bool:
        """Whether each block also attends to the prompt's tokens (format version 2; their width: context_dim)."""
        return self.format_version == PROMPT_FORMAT_VERSION

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
        """Parse and sanity-check safetensors metadata (files come from strangers); `source` names the file."""
        if not strings or _METADATA_KEY not in strings:
            raise AdapterFileError(
                f"{source} has no SuTI metadata ('{_METADATA_KEY}'); it is not a SuTI adapter. "
                "Use a file written by the SuTI trainer (save_adapter)."
            )
        try:
            raw = json.loads(strings[_METADATA_KEY], object_pairs_hook=_unique_keys)
        except (TypeError, ValueError, RecursionError) as e:
            raise _malformed(source, e) from e
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if type(version) is int and version not in SUPPORTED_FORMAT_VERSIONS:
            raise AdapterFileError(
                f"{source} uses adapter format version {_REPR.repr(version)}; this ComfyUI-SuTI reads versions "
                f"{sorted(SUPPORTED_FORMAT_VERSIONS)}. Update ComfyUI-SuTI or re-export the adapter."
            )
        version, architecture, context_dim, blocks = _fields(raw, _METADATA_FIELDS, "", source)
        if type(version) is not int:
            raise _bad_field(source, "format_version", version, f"an integer in {sorted(SUPPORTED_FORMAT_VERSIONS)}")
        if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
            raise _bad_field(source, "architecture", architecture, f"one of {sorted(ARCHITECTURES)}")
        if not isinstance(blocks, list) or not blocks:
            raise _bad_field(source, "blocks", blocks, "a non-empty list of blocks")
        specs = tuple(_parse_block(block, f"blocks[{i}].", source) for i, block in enumerate(blocks))
        _check_unique_keys(specs, source)
        return cls(version, architecture, _dim(context_dim, "context_dim", source), specs)


_METADATA_FIELDS = tuple(f.name for f in fields(AdapterMetadata))
_BLOCK_FIELDS = tuple(f.name for f in fields(BlockSpec))
_MAX_DIM = 1 << 16  # far above any real width (SDXL context: 2048); caps hostile sizes before a tensor is made
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80  # a whole block key, but not a hostile blob, in a message


def _malformed(source: str, problem: object) -> AdapterFileError:
    return AdapterFileError(f"{source} has malformed SuTI metadata ({problem}); re-export the adapter.")


def _bad_field(source: str, field: str, value: object, expected: str) -> AdapterFileError:
    return _malformed(source, f"field {field} is {_REPR.repr(value)}, expected {expected}")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads hook: a key written twice is an error (json would silently keep the last value)."""
    twice = [key for key, count in Counter(key for key, _ in pairs).items() if count > 1]
    if twice:
        raise ValueError(f"key {twice[0]!r} appears twice in one JSON object")
    return dict(pairs)


def _fields(raw: object, names: tuple[str, ...], prefix: str, source: str) -> list[object]:
    """The values of exactly `names` in a JSON object; a missing or unknown field is named (`prefix` + name)."""
    if not isinstance(raw, dict):
        raise _bad_field(source, prefix.rstrip(".") or _METADATA_KEY, raw, "a JSON object")
    missing = [name for name in names if name not in raw]
    unknown = sorted(raw.keys() - set(names))
    if missing:
        raise _malformed(source, f"field {prefix}{missing[0]} is missing")
    if unknown:
        where = prefix.rstrip(".") or "the metadata"
        raise _malformed(source, f"{where} has an unknown field {_REPR.repr(unknown[0])}")
    return [raw[name] for name in names]


def _dim(value: object, field: str, source: str) -> int:
    """A positive width; bools, floats and strings are refused although int() would take them."""
    if type(value) is not int or not 0 < value <= _MAX_DIM:
        raise _bad_field(source, field, value, f"an integer from 1 to {_MAX_DIM}")
    return value


def _block_key(value: object, field: str, source: str) -> str:
    """A transformer block key in its one canonical spelling (`demo_features.block_key`)."""
    from .demo_features import block_key, parse_block_key  # lazy: demo_features imports this module

    try:
        if block_key(*parse_block_key(value)) == value:
            return value
    except (TypeError, ValueError):
        pass
    raise _bad_field(source, field, value, "a block key such as 'input_blocks.1.1.transformer_blocks.0'")


def _parse_block(raw: object, prefix: str, source: str) -> BlockSpec:
    """One block, every field checked: keys in the known grammar, dims positive integers."""
    values = dict(zip(_BLOCK_FIELDS, _fields(raw, _BLOCK_FIELDS, prefix, source)))
    keys = {name: _block_key(values[name], prefix + name, source) for name in ("key", "source_key")}
    dims = {name: _dim(values[name], prefix + name, source) for name in _BLOCK_FIELDS if name not in keys}
    return BlockSpec(**keys, **dims)


def _check_unique_keys(blocks: tuple[BlockSpec, ...], source: str) -> None:
    """A block listed twice would silently replace the first one's module."""
    seen: set[str] = set()
    for index, block in enumerate(blocks):
        if block.key in seen:
            raise _malformed(source, f"field blocks[{index}].key {block.key!r} lists a block a second time")
        seen.add(block.key)


def check_adapter_matches_model(
    metadata: AdapterMetadata,
    model_architecture: str,
    model_context_dim: int,
    model_blocks: Sequence[BlockSpec],
    compare_sources: bool = True,
) -> None:
    """Raise AdapterMismatchError naming the first difference between adapter and model; `compare_sources`
    False accepts an adapter trained on another demo feature source (same dims, other block map)."""
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
        if (spec.query_dim, spec.neighbor_dim) != (found.query_dim, found.neighbor_dim) or (
            compare_sources and spec.source_key != found.source_key
        ):
            raise AdapterMismatchError(
                f"block {spec.key}: adapter expects query_dim {spec.query_dim}, neighbor_dim {spec.neighbor_dim}, "
                f"neighbors from {spec.source_key}; the model has query_dim {found.query_dim}, neighbor_dim "
                f"{found.neighbor_dim}, neighbors from {found.source_key}; {fix}"
            )
