"""Block keys, block map and demo feature recording (pure suti_core)."""

import pytest
import torch

from suti_core.demo_features import DemoFeatures, FeatureRecorder, block_key, build_block_map, parse_block_key


@pytest.mark.parametrize(
    "block, key",
    [
        (("input", 1, 0), "input_blocks.1.1.transformer_blocks.0"),
        (("middle", 0, 3), "middle_block.1.transformer_blocks.3"),
        (("output", 11, 1), "output_blocks.11.1.transformer_blocks.1"),
    ],
)
def test_block_key_round_trip(block, key):
    assert block_key(*block) == key
    assert parse_block_key(key) == block


@pytest.mark.parametrize("bad", ["input_blocks.1.0.transformer_blocks.0", "middle_block.1.attn1", "foo"])
def test_parse_block_key_rejects_other_paths(bad):
    with pytest.raises(ValueError, match="not a transformer block key"):
        parse_block_key(bad)


def test_block_key_rejects_unknown_block_name():
    with pytest.raises(ValueError, match="unknown block name 'down'"):
        block_key("down", 1, 0)


def test_block_map_sd1_layout_uses_last_down_block_at_same_resolution():
    blocks = [
        ("input_blocks.1.1.transformer_blocks.0", 0),
        ("input_blocks.2.1.transformer_blocks.0", 0),
        ("input_blocks.4.1.transformer_blocks.0", 1),
        ("input_blocks.5.1.transformer_blocks.0", 1),
        ("middle_block.1.transformer_blocks.0", 2),
        ("output_blocks.3.1.transformer_blocks.0", 1),
        ("output_blocks.6.1.transformer_blocks.0", 0),
    ]
    assert build_block_map(blocks) == {
        "input_blocks.1.1.transformer_blocks.0": "input_blocks.1.1.transformer_blocks.0",
        "input_blocks.2.1.transformer_blocks.0": "input_blocks.2.1.transformer_blocks.0",
        "input_blocks.4.1.transformer_blocks.0": "input_blocks.4.1.transformer_blocks.0",
        "input_blocks.5.1.transformer_blocks.0": "input_blocks.5.1.transformer_blocks.0",
        "middle_block.1.transformer_blocks.0": "middle_block.1.transformer_blocks.0",
        "output_blocks.3.1.transformer_blocks.0": "input_blocks.5.1.transformer_blocks.0",
        "output_blocks.6.1.transformer_blocks.0": "input_blocks.2.1.transformer_blocks.0",
    }


def test_block_map_prefers_middle_block_at_shared_resolution_and_skips_unmatched_output():
    blocks = [
        ("input_blocks.7.1.transformer_blocks.1", 2),
        ("middle_block.1.transformer_blocks.0", 2),
        ("middle_block.1.transformer_blocks.1", 2),
        ("output_blocks.0.1.transformer_blocks.0", 2),
        ("output_blocks.9.1.transformer_blocks.0", 0),
    ]
    block_map = build_block_map(blocks)
    assert block_map["output_blocks.0.1.transformer_blocks.0"] == "middle_block.1.transformer_blocks.1"
    assert "output_blocks.9.1.transformer_blocks.0" not in block_map


def test_recorder_concatenates_demos_along_tokens():
    recorder = FeatureRecorder(["a", "b"])
    first, second = torch.randn(1, 4, 3), torch.randn(2, 4, 3)
    for hidden in (first, second):
        recorder.record("a", hidden)
        recorder.record("b", hidden[:, :2])
        recorder.record("ignored", hidden)
    features = recorder.features()
    assert set(features) == {"a", "b"}
    assert features["a"].shape == (1, 12, 3)
    assert torch.equal(features["a"], torch.cat([first, second[0:1], second[1:2]], dim=1))
    assert features["b"].shape == (1, 6, 3)


def test_recorder_reports_blocks_that_never_ran():
    recorder = FeatureRecorder(["a", "input_blocks.1.1.transformer_blocks.0"])
    recorder.record("a", torch.randn(1, 2, 3))
    with pytest.raises(RuntimeError, match="no demo features were recorded for 1 blocks"):
        recorder.features()


def test_demo_features_are_shared_not_copied_and_follow_block_map():
    import copy

    feats = DemoFeatures({"src": torch.randn(1, 4, 3)})
    assert copy.deepcopy(feats) is feats
    assert feats.for_block("dst", {"dst": "src"}) is feats.by_key["src"]
    assert feats.for_block("other", {"dst": "src"}) is None


def test_parse_block_weights_defaults_and_overrides():
    from suti_core.demo_features import parse_block_weights

    assert parse_block_weights("") == {"input": 1.0, "middle": 1.0, "output": 1.0}
    assert parse_block_weights(" output:0.5,\nInput: 0 ") == {"input": 0.0, "middle": 1.0, "output": 0.5}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("down:1", "is not 'group:weight' with group one of input, middle, output"),
        ("output", "is not 'group:weight'"),
        ("output:lots", "'lots' is not a number"),
        ("middle:-1", "weight must be between 0 and 2"),
    ],
)
def test_parse_block_weights_errors(text, fragment):
    from suti_core.demo_features import parse_block_weights

    with pytest.raises(ValueError) as err:
        parse_block_weights(text)
    assert fragment in str(err.value)
