"""Adapter file format: safetensors round trip, metadata, and every load/match error message."""

import dataclasses
import pickle

import pytest
import torch
from safetensors.torch import save_file

from suti_core.adapter import SuTIAdapter, load_adapter, new_adapter_for_blocks, save_adapter, widened
from suti_core.adapter_format import (
    AdapterFileError,
    AdapterMetadata,
    AdapterMismatchError,
    BlockSpec,
    check_adapter_matches_model,
)

BLOCKS = (
    BlockSpec("input_blocks.1.1.transformer_blocks.0", 8, 8, 2, 4, "input_blocks.1.1.transformer_blocks.0"),
    BlockSpec("middle_block.1.transformer_blocks.0", 16, 16, 2, 8, "middle_block.1.transformer_blocks.0"),
    BlockSpec("output_blocks.3.1.transformer_blocks.0", 8, 8, 2, 4, "input_blocks.1.1.transformer_blocks.0"),
)


def _adapter(seed: int = 0) -> SuTIAdapter:
    adapter = new_adapter_for_blocks("sd1", 32, BLOCKS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return adapter


def test_state_dict_uses_ldm_block_keys():
    keys = set(new_adapter_for_blocks("sd1", 32, BLOCKS).state_dict())
    assert "input_blocks.1.1.transformer_blocks.0.to_q.weight" in keys
    assert "middle_block.1.transformer_blocks.0.to_out.bias" in keys
    assert all(k.split(".to_")[0].split(".norm")[0] in {b.key for b in BLOCKS} for k in keys)


def test_new_adapter_is_zero_initialised_in_every_block():
    adapter = new_adapter_for_blocks("sd1", 32, BLOCKS)
    for spec in BLOCKS:
        out = adapter.block(spec.key).to_out
        assert torch.count_nonzero(out.weight) == 0 and torch.count_nonzero(out.bias) == 0


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    adapter = _adapter()
    path = tmp_path / "a.safetensors"
    save_adapter(path, adapter)
    loaded = load_adapter(path)
    assert loaded.metadata == adapter.metadata
    assert (
        loaded.metadata.block_map["output_blocks.3.1.transformer_blocks.0"] == "input_blocks.1.1.transformer_blocks.0"
    )
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_adapter(path, _adapter())
    assert path.read_bytes() == b"user data"
    save_adapter(path, _adapter(), overwrite=True)
    assert load_adapter(path).metadata.architecture == "sd1"


def test_widening_adds_heads_without_changing_what_the_adapter_computes():
    narrow = _adapter(seed=4)
    blocks = tuple(dataclasses.replace(b, heads=2 * b.heads) if b.query_dim == 8 else b for b in BLOCKS)
    wide = widened(narrow, blocks)
    assert [wide.block(b.key).heads for b in BLOCKS] == [4, 2, 4]
    for spec in BLOCKS:
        hidden = torch.randn(2, 5, spec.query_dim, generator=torch.Generator().manual_seed(1))
        neighbors = torch.randn(1, 6, spec.neighbor_dim, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(wide.block(spec.key)(hidden, neighbors), narrow.block(spec.key)(hidden, neighbors))
    added = wide.block(BLOCKS[0].key)
    assert added.to_out.weight[:, 8:].abs().max() == 0 and added.to_q.weight[8:].abs().max() > 0, \
        "an added head starts silent but can learn"
    with pytest.raises(ValueError, match="cannot widen .* no fewer heads"):
        widened(wide, BLOCKS)


def test_an_adapter_reading_the_prompt_is_format_version_2_and_round_trips(tmp_path):
    """Prompt projections are added at zero to a file without them (the rest kept) and survive save and load;
    files without them stay version 1."""
    plain = _adapter(seed=5)
    reading = widened(plain, BLOCKS, reads_prompt=True)
    assert (plain.metadata.format_version, reading.metadata.format_version) == (1, 2)
    for spec in BLOCKS:
        module = reading.block(spec.key)
        assert module.to_k_prompt.weight.shape == (spec.heads * spec.dim_head, plain.metadata.context_dim)
        assert module.to_v_prompt.weight.abs().max() == 0 and module.to_k_prompt.weight.abs().max() == 0
        assert torch.equal(module.to_out.weight, plain.block(spec.key).to_out.weight)
        module.to_v_prompt.weight.data.normal_()
    save_adapter(tmp_path / "reading.safetensors", reading)
    loaded = load_adapter(tmp_path / "reading.safetensors")
    assert loaded.metadata.reads_prompt and not plain.metadata.reads_prompt
    for (key, a), b in zip(reading.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert widened(loaded, BLOCKS).metadata.reads_prompt, "widening keeps the prompt projections"


def test_metadata_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="architecture 'sd3' is not one of"):
        AdapterMetadata(1, "sd3", 32, BLOCKS)


def _write_bad_version(path):
    strings = _adapter().metadata.to_strings()
    strings["suti.adapter"] = strings["suti.adapter"].replace('"format_version": 1', '"format_version": 99')
    save_file({k: v.contiguous() for k, v in _adapter().state_dict().items()}, str(path), metadata=strings)


def _write_wrong_shape(path):
    tensors = {k: v.contiguous() for k, v in _adapter().state_dict().items()}
    tensors["middle_block.1.transformer_blocks.0.to_q.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path), metadata=_adapter().metadata.to_strings())


def _write_missing_tensor(path):
    tensors = {k: v.contiguous() for k, v in _adapter().state_dict().items()}
    del tensors["middle_block.1.transformer_blocks.0.to_k.weight"]
    save_file(tensors, str(path), metadata=_adapter().metadata.to_strings())


def _write_truncated(path):
    save_adapter(path, _adapter())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_pickle(path):
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))


def _write_torch_save(path):
    torch.save(_adapter().state_dict(), str(path))


def _write_plain_safetensors(path):
    save_file({"w": torch.zeros(2)}, str(path))


def _write_malformed_metadata(path):
    save_file({"w": torch.zeros(2)}, str(path), metadata={"suti.adapter": "{not json"})


@pytest.mark.parametrize(
    "writer, fragment",
    [
        (None, "does not exist; put SuTI adapters in ComfyUI's models/suti folder"),
        (_write_truncated, "is probably truncated or corrupt"),
        (_write_pickle, "is a pickle/PyTorch checkpoint renamed to .safetensors"),
        (_write_torch_save, "is a pickle/PyTorch checkpoint renamed to .safetensors"),
        (_write_plain_safetensors, "has no SuTI metadata ('suti.adapter'); it is not a SuTI adapter"),
        (_write_malformed_metadata, "has malformed SuTI metadata"),
        (_write_bad_version, "uses adapter format version 99; this ComfyUI-SuTI reads versions [1, 2]"),
        (_write_wrong_shape, "to_q.weight has shape (3, 3) but its metadata implies (16, 16)"),
        (_write_missing_tensor, "tensors do not match its metadata (1 missing"),
    ],
)
def test_load_errors_say_what_is_wrong_and_what_to_do(tmp_path, writer, fragment):
    path = tmp_path / "adapter.safetensors"
    if writer is not None:
        writer(path)
    with pytest.raises(AdapterFileError) as err:
        load_adapter(path)
    assert fragment in str(err.value)


def _model_blocks(scale: int = 1):
    return [
        BlockSpec(b.key, b.query_dim * scale, b.neighbor_dim * scale, b.heads, b.dim_head, b.source_key) for b in BLOCKS
    ]


def test_matching_model_passes():
    check_adapter_matches_model(_adapter().metadata, "sd1", 32, _model_blocks())


@pytest.mark.parametrize(
    "arch, context, blocks, fragment",
    [
        (
            "sdxl",
            2048,
            _model_blocks(),
            "adapter was trained for sd1 (context 32, 3 blocks) but the model is sdxl (context 2048, 3 blocks); load an adapter made for this base model",
        ),
        (
            "sd1",
            32,
            _model_blocks()[:2],
            "adapter blocks do not match the model's transformer blocks: adapter sd1 (context 32, 3 blocks), model sd1 (context 32, 2 blocks), e.g. output_blocks.3.1.transformer_blocks.0 is not in the model",
        ),
        ("sd1", 32, _model_blocks(2), "block input_blocks.1.1.transformer_blocks.0: adapter expects query_dim 8"),
    ],
)
def test_mismatch_errors_name_the_difference(arch, context, blocks, fragment):
    with pytest.raises(AdapterMismatchError) as err:
        check_adapter_matches_model(_adapter().metadata, arch, context, blocks)
    assert fragment in str(err.value)
