"""SuTIAdapter: one NeighborAttention per transformer block, saved as safetensors + metadata."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter_format import FORMAT_VERSION, PROMPT_FORMAT_VERSION, AdapterFileError, AdapterMetadata, BlockSpec
from .neighbor_attention import NeighborAttention

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2, torch.save zip archive


class SuTIAdapter(nn.Module):
    """Neighbor attention modules stored under their LDM block keys (e.g. `middle_block.1.transformer_blocks.0`)."""

    def __init__(self, metadata: AdapterMetadata) -> None:
        super().__init__()
        self.metadata = metadata
        prompt_dim = metadata.context_dim if metadata.reads_prompt else 0
        for spec in metadata.blocks:
            _set_submodule(
                self, spec.key,
                NeighborAttention(spec.query_dim, spec.neighbor_dim, spec.heads, spec.dim_head, prompt_dim),
            )

    def block(self, key: str) -> NeighborAttention:
        """The neighbor attention of a block key."""
        return self.get_submodule(key)


def _set_submodule(root: nn.Module, key: str, module: nn.Module) -> None:
    """Place `module` at dotted path `key`, creating empty container modules on the way."""
    *parents, name = key.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(name, module)


def new_adapter_for_blocks(architecture: str, context_dim: int, blocks: Sequence[BlockSpec],
                           reads_prompt: bool = False) -> SuTIAdapter:
    """A zero-initialised (no-op) adapter for a model's transformer blocks (reading the prompt too: format 2)."""
    version = PROMPT_FORMAT_VERSION if reads_prompt else FORMAT_VERSION
    return SuTIAdapter(AdapterMetadata(version, architecture, context_dim, tuple(blocks)))


@torch.no_grad()
def widened(adapter: SuTIAdapter, blocks: Sequence[BlockSpec], reads_prompt: bool = False) -> SuTIAdapter:
    """`adapter` grown to `blocks` (the same keys, dims and dim_head, at least as many heads each) and, with
    `reads_prompt`, to the prompt's tokens: each block's heads keep their weights, an added head's queries, keys
    and values start as a new module's and its output columns at zero, so training grows it from where the
    narrower adapter stood (computing the same function); added prompt projections start at zero (the prompt's
    tokens then add nothing and, at PROMPT_LOGIT, take a few % of the attention)."""
    reads_prompt = reads_prompt or adapter.metadata.reads_prompt
    wide = new_adapter_for_blocks(adapter.metadata.architecture, adapter.metadata.context_dim, blocks, reads_prompt)
    narrow_specs = {spec.key: spec for spec in adapter.metadata.blocks}
    for spec in blocks:
        old = narrow_specs.get(spec.key)
        if old is None or (old.query_dim, old.neighbor_dim, old.dim_head) != (spec.query_dim, spec.neighbor_dim,
                                                                              spec.dim_head) or old.heads > spec.heads:
            raise ValueError(f"block {spec.key}: cannot widen {old} to {spec} (same dims and dim_head, no fewer heads)")
        source, target = adapter.block(spec.key), wide.block(spec.key)
        inner = old.heads * old.dim_head
        target.norm.load_state_dict(source.norm.state_dict())
        for name in ("to_q", "to_k", "to_v"):
            getattr(target, name).weight[:inner] = getattr(source, name).weight
        target.to_out.weight[:, :inner] = source.to_out.weight
        target.to_out.bias.copy_(source.to_out.bias)
        if source.reads_prompt:
            target.to_k_prompt.weight[:inner] = source.to_k_prompt.weight
            target.to_v_prompt.weight[:inner] = source.to_v_prompt.weight
    return wide


def save_adapter(path: str | os.PathLike, adapter: SuTIAdapter, overwrite: bool = False) -> None:
    """Write tensors + metadata as safetensors; an existing file is kept unless overwrite=True."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another file name")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=adapter.metadata.to_strings())
    os.replace(partial, path)  # never leave a half-written adapter under the real name


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    safetensors_header = head[8:9] == b"{"  # 8-byte header length, then the JSON header
    return head.startswith(_PICKLE_MAGIC) and not safetensors_header


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except Exception as e:  # safetensors raises its own error types for every header/data fault
        if _looks_like_pickle(path):
            raise AdapterFileError(
                f"{path} is a pickle/PyTorch checkpoint renamed to .safetensors, not a safetensors file. "
                "SuTI loads only real safetensors (pickles can run code): re-export the adapter with save_adapter."
            ) from e
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({e}); it is probably truncated or corrupt "
            f"({path.stat().st_size} bytes): copy or download it again."
        ) from e


def _check_tensors(path: Path, metadata: AdapterMetadata, tensors: dict[str, torch.Tensor]) -> None:
    """Tensor names, shapes and dtypes against what the metadata implies, before any real weight is allocated."""
    with torch.device("meta"):  # shapes only: a hostile size in the metadata allocates nothing
        expected = SuTIAdapter(metadata).state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise AdapterFileError(
            f"{path}: tensors do not match its metadata ({len(missing)} missing, e.g. {missing[:1]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:1]}); re-export the adapter."
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise AdapterFileError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)} but its metadata implies "
                f"{tuple(expected[key].shape)}; re-export the adapter."
            )
        if not tensor.is_floating_point():
            raise AdapterFileError(f"{path}: tensor {key} has dtype {tensor.dtype}, not float; re-export the adapter.")


def _build_adapter(path: Path, tensors: dict[str, torch.Tensor], strings: dict[str, str] | None) -> SuTIAdapter:
    """Metadata first, then tensors against it, and only then real weights (the file may come from a stranger)."""
    metadata = AdapterMetadata.from_strings(strings, str(path))
    _check_tensors(path, metadata, tensors)
    adapter = SuTIAdapter(metadata)
    adapter.load_state_dict(tensors)
    return adapter.eval()


def load_adapter(path: str | os.PathLike) -> SuTIAdapter:
    """Read and validate an adapter file written by `save_adapter`; every fault is an AdapterFileError."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist; put SuTI adapters in ComfyUI's models/suti folder")
    tensors, strings = _read_safetensors(path)
    try:
        return _build_adapter(path, tensors, strings)
    except AdapterFileError:
        raise
    except Exception as e:  # the checks should leave nothing, but a stranger's file must still fail clearly
        raise AdapterFileError(
            f"{path}: building the adapter from its metadata failed ({type(e).__name__}: {e}); re-export the adapter."
        ) from e
