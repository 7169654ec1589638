"""Hostile adapter files (issue 10): seeded mutations of a valid adapter's metadata load as a good adapter or
fail with an AdapterFileError naming the file and the field — never any other exception."""

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from suti_core.adapter import SuTIAdapter, load_adapter, new_adapter_for_blocks, save_adapter
from suti_core.adapter_format import AdapterFileError, BlockSpec

BLOCKS = (
    BlockSpec("input_blocks.1.1.transformer_blocks.0", 8, 8, 2, 4, "input_blocks.1.1.transformer_blocks.0"),
    BlockSpec("middle_block.1.transformer_blocks.0", 16, 8, 2, 8, "middle_block.1.transformer_blocks.0"),
    BlockSpec("output_blocks.3.1.transformer_blocks.0", 8, 8, 2, 4, "input_blocks.1.1.transformer_blocks.0"),
)
CASES = 400
WRONG_VALUES = [
    None, True, False, 0, -1, -(2**31), 2**63, 10**40, 1.5, 8.0, float("nan"), float("inf"), "", " ", "8",
    "\u200b", "garbage", "x" * 5000, [], [8], {}, {"key": 1}, "input_blocks.01.1.transformer_blocks.0",
    "middle_block.1.transformer_blocks.0\n", "input_blocks.1.1.transformer_blocks.0.to_q", "a..b", ".",
    "middle_block.1.transformer_blocks.\u0661", "output_blocks.3.1.transformer_blocks.0", "sd3", "toy",
]  # fmt: skip


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors and metadata JSON of a small adapter written by save_adapter."""
    path = tmp_path_factory.mktemp("valid") / "valid.safetensors"
    save_adapter(path, new_adapter_for_blocks("sd1", 32, BLOCKS))
    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), f.metadata()["suti.adapter"]


def _some_dict(meta: dict, rng: random.Random) -> dict:
    """The top-level object or one of its blocks (when blocks is still a list of objects)."""
    blocks = [b for b in meta.get("blocks", []) if isinstance(b, dict)] if isinstance(meta.get("blocks"), list) else []
    return rng.choice([meta, *blocks])


def _delete_field(meta, rng):
    target = _some_dict(meta, rng)
    if target:
        del target[rng.choice(sorted(target))]


def _wrong_value(meta, rng):
    target = _some_dict(meta, rng)
    target[rng.choice(sorted(target) or ["key"])] = rng.choice(WRONG_VALUES)


def _bad_number(meta, rng):
    target = _some_dict(meta, rng)
    numbers = [k for k, v in target.items() if type(v) is int]
    if numbers:
        key = rng.choice(numbers)
        target[key] = rng.choice([0, -target[key], target[key] * 2**20, target[key] + 1, target[key] - 1])


def _swap_between_blocks(meta, rng):
    blocks = meta.get("blocks")
    if isinstance(blocks, list) and len(blocks) > 1 and all(isinstance(b, dict) for b in blocks):
        a, b = rng.sample(blocks, 2)
        key = rng.choice(sorted(a.keys() & b.keys()) or ["key"])
        a[key], b[key] = b.get(key), a.get(key)


def _reshape_blocks(meta, rng):
    blocks = meta.get("blocks")
    if isinstance(blocks, list) and blocks:
        choice = rng.randrange(4)
        if choice == 0:
            blocks.append(dict(rng.choice(blocks)) if isinstance(blocks[0], dict) else blocks[0])  # duplicate
        elif choice == 1:
            blocks.pop(rng.randrange(len(blocks)))
        elif choice == 2:
            rng.shuffle(blocks)  # order alone is harmless
        else:
            meta["blocks"] = rng.choice([[], {}, "blocks", None, blocks[0]])


def _unknown_field(meta, rng):
    _some_dict(meta, rng)[rng.choice(["extra", "", "key ", "Heads"])] = rng.choice(WRONG_VALUES)


MUTATIONS = [_delete_field, _wrong_value, _bad_number, _swap_between_blocks, _reshape_blocks, _unknown_field]


def _mangle_text(text: str, rng: random.Random) -> str:
    """Mutations of the JSON text itself: broken syntax, a repeated key, another top-level type."""
    choice = rng.randrange(5)
    if choice == 0:
        return text[: rng.randrange(len(text))]
    if choice == 1:
        at = rng.randrange(len(text))
        return text[:at] + rng.choice(["\x00", "}", "[", '"', ",", "\u200b", "NaN"]) + text[at:]
    if choice == 2:
        return text.replace('"heads": 2', '"heads": 2, "heads": -1', 1)
    if choice == 3:
        return text.replace('"architecture": "sd1"', '"architecture": "sd1", "architecture": "sd1"', 1)
    return rng.choice(["", "null", "[]", "1", '"text"', "[" * 10000, json.dumps([json.loads(text)])])


def _mutate(text: str, rng: random.Random) -> tuple[str, list[str]]:
    meta, done = json.loads(text), []
    for mutation in rng.choices(MUTATIONS, k=rng.randint(1, 3)):
        mutation(meta, rng)
        done.append(mutation.__name__)
    text = json.dumps(meta)
    if rng.random() < 0.2:
        text, done = _mangle_text(text, rng), [*done, "_mangle_text"]
    return text, done


def _load(path, tensors: dict[str, torch.Tensor], text: str):
    save_file(tensors, str(path), metadata={"suti.adapter": text, "format": "pt"})
    return load_adapter(path)


def test_mutated_metadata_loads_or_raises_adapter_file_error(tmp_path, valid):
    tensors, text = valid
    path = tmp_path / "mutated.safetensors"
    outcomes, failures = {"good": 0, "refused": 0}, []
    for seed in range(CASES):
        mutated, done = _mutate(text, random.Random(seed))
        try:
            adapter = _load(path, tensors, mutated)
        except AdapterFileError as e:
            outcomes["refused"] += 1
            if str(path) not in str(e) or "re-export the adapter" not in str(e):
                failures.append(f"seed {seed} {done}: message lacks the file or the fix: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - any other type is the bug this test looks for
            failures.append(f"seed {seed} {done}: {type(e).__name__}: {e}")
            continue
        outcomes["good"] += 1
        assert isinstance(adapter, SuTIAdapter)
        assert all(torch.equal(adapter.state_dict()[k], t) for k, t in tensors.items()), f"seed {seed} {done}"
    assert not failures, f"{len(failures)} of {CASES} cases failed, e.g.\n" + "\n".join(failures[:5])
    assert outcomes["good"] and outcomes["refused"] > CASES // 2, f"the fuzz lost its spread: {outcomes}"


def _edit(text: str, block: int, field: str, value) -> str:
    meta = json.loads(text)
    meta["blocks"][block][field] = value
    return json.dumps(meta)


@pytest.mark.parametrize(
    "block, field, value, fragment",
    [
        (0, "key", "", "field blocks[0].key is '', expected a block key such as"),  # was KeyError from add_module
        (1, "heads", -1, "field blocks[1].heads is -1, expected an integer from 1 to 65536"),  # was RuntimeError
        (1, "dim_head", True, "field blocks[1].dim_head is True, expected an integer"),
        (2, "query_dim", 8.0, "field blocks[2].query_dim is 8.0, expected an integer"),
        (0, "neighbor_dim", 10**12, "field blocks[0].neighbor_dim is 1000000000000, expected an integer"),
        (2, "source_key", "decoder", "field blocks[2].source_key is 'decoder', expected a block key"),
        (0, "key", "input_blocks.01.1.transformer_blocks.0", "field blocks[0].key is 'input_blocks.01.1"),
        (
            2, "key", "input_blocks.1.1.transformer_blocks.0",
            "field blocks[2].key 'input_blocks.1.1.transformer_blocks.0' lists a block a second time",
        ),
        (0, "extra", 1, "blocks[0] has an unknown field 'extra'"),
    ],
)  # fmt: skip
def test_bad_block_field_is_named_with_the_file_and_the_fix(tmp_path, valid, block, field, value, fragment):
    tensors, text = valid
    path = tmp_path / "hostile.safetensors"
    with pytest.raises(AdapterFileError) as err:
        _load(path, tensors, _edit(text, block, field, value))
    message = str(err.value)
    assert fragment in message and str(path) in message and "re-export the adapter" in message, message


@pytest.mark.parametrize(
    "old, new, fragment",
    [
        ('"architecture": "sd1"', '"architecture": "sd1", "architecture": "sdxl"', "key 'architecture' appears twice"),
        ('"format_version": 1', '"format_version": "1"', "field format_version is '1', expected an integer in [1, 2]"),
        ('"context_dim": 32', '"context_dim": 0', "field context_dim is 0, expected an integer from 1"),
        ('"architecture": "sd1"', '"architecture": ["sd1"]', "field architecture is ['sd1'], expected one of"),
        ('"architecture": "sd1"', '"architecture": "sd1", "blocks": []', "key 'blocks' appears twice"),
    ],
)
def test_bad_metadata_json_is_named(tmp_path, valid, old, new, fragment):
    tensors, text = valid
    assert old in text, "the valid metadata changed its spelling; update this table"
    with pytest.raises(AdapterFileError, match="re-export the adapter") as err:
        _load(tmp_path / "hostile.safetensors", tensors, text.replace(old, new, 1))
    assert fragment in str(err.value), str(err.value)


def test_top_level_that_is_no_object_is_named(tmp_path, valid):
    with pytest.raises(AdapterFileError, match=r"field suti.adapter is \[\], expected a JSON object"):
        _load(tmp_path / "hostile.safetensors", valid[0], "[]")
