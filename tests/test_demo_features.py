"""Block keys, block map and demo feature recording (pure suti_core)."""

import math
import re

import pytest
import torch

from suti_core.demo_features import (
    MAX_TOKENS_PER_DEMO,
    DemoFeatures,
    FeatureRecorder,
    block_key,
    block_specs,
    build_block_map,
    demo_token_mask,
    feature_source_of,
    needs_decoder,
    parse_block_key,
    pool_demo_tokens,
    pooled_grid,
)
from suti_core.neighbor_attention import NeighborAttention


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


def test_block_map_with_decoder_features_reads_every_block_itself():
    blocks = [
        ("input_blocks.1.1.transformer_blocks.0", 0),
        ("middle_block.1.transformer_blocks.0", 1),
        ("output_blocks.3.1.transformer_blocks.0", 1),
        ("output_blocks.9.1.transformer_blocks.0", 0),
    ]
    block_map = build_block_map(blocks, "encoder+decoder")
    assert block_map == {key: key for key, _ in blocks}
    assert feature_source_of(block_map) == "encoder+decoder" and needs_decoder(block_map.values())
    encoder = build_block_map(blocks)
    assert feature_source_of(encoder) == "encoder" and not needs_decoder(encoder.values())
    with pytest.raises(ValueError, match="not one of encoder, encoder\\+decoder"):
        build_block_map(blocks, "decoder")


def test_block_specs_take_the_neighbor_width_of_their_source():
    blocks = [("input_blocks.1.1.transformer_blocks.0", 0, 32, 2, 16), ("middle_block.1.transformer_blocks.0", 1, 64, 4, 16),
              ("output_blocks.5.1.transformer_blocks.0", 0, 48, 3, 16)]
    encoder, decoder = block_specs(blocks), block_specs(blocks, "encoder+decoder")
    assert (encoder[2].query_dim, encoder[2].neighbor_dim, encoder[2].source_key) == (48, 32, blocks[0][0])
    assert (decoder[2].neighbor_dim, decoder[2].source_key) == (48, blocks[2][0])


def test_finest_heads_widen_only_the_finest_levels_blocks():
    blocks = [("input_blocks.1.1.transformer_blocks.0", 0, 32, 2, 16), ("middle_block.1.transformer_blocks.0", 1, 64, 4, 16),
              ("output_blocks.5.1.transformer_blocks.0", 0, 48, 3, 16)]
    assert [(s.heads, s.dim_head) for s in block_specs(blocks, finest_heads=8)] == [(8, 16), (4, 16), (8, 16)]
    assert [s.heads for s in block_specs(blocks)] == [2, 4, 3]


def test_recorder_concatenates_demos_along_tokens():
    recorder = FeatureRecorder(["a", "b"])
    first, second = torch.randn(1, 4, 3), torch.randn(2, 4, 3)
    for hidden in (first, second):
        recorder.record("a", hidden, (2, 2))
        recorder.record("b", hidden[:, :2], (1, 2))
        recorder.record("ignored", hidden, (2, 2))
    features = recorder.features()
    assert set(features.by_key) == {"a", "b"} and features.masks is None
    assert features.by_key["a"].shape == (1, 12, 3)
    assert torch.equal(features.by_key["a"], torch.cat([first, second[0:1], second[1:2]], dim=1))
    assert features.by_key["b"].shape == (1, 6, 3)


def test_recorder_groups_demos_per_training_sample_with_their_masks():
    recorder = FeatureRecorder(["a"])
    hidden = torch.randn(4, 4, 3)  # 2 samples x 2 demos, 2x2 tokens each
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1  # the top-left token only
    recorder.record("a", hidden, (2, 2), [mask, None, None, mask])
    features = recorder.features(groups=2)
    assert features.by_key["a"].shape == (2, 8, 3)
    assert torch.equal(features.by_key["a"][1, 4:], hidden[3])
    expected = torch.tensor([[1, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(features.masks["a"], expected)
    assert torch.equal(features.mask_for_block("b", {"b": "a"}), expected)


def test_large_blocks_keep_at_most_the_token_cap_per_demo():
    assert pooled_grid((64, 64)) == (32, 32) and pooled_grid((128, 96)) == (32, 24) and pooled_grid((16, 16)) == (16, 16)
    hidden = torch.randn(2, 64 * 64, 5)
    pooled = pool_demo_tokens(hidden, (64, 64))
    assert pooled.shape == (2, MAX_TOKENS_PER_DEMO, 5)
    grid = hidden.reshape(2, 32, 2, 32, 2, 5)
    torch.testing.assert_close(pooled.reshape(2, 32, 32, 5), grid.mean(dim=(2, 4)))
    mask = torch.zeros(512, 512)
    mask[:8, :8] = 1  # touches only the first token of the pooled 32x32 grid
    tokens = demo_token_mask(mask, (64, 64))
    assert tokens.shape == (1024,) and tokens.sum() == 1 and tokens[0]


def test_recorder_reports_blocks_that_never_ran():
    recorder = FeatureRecorder(["a", "input_blocks.1.1.transformer_blocks.0"])
    recorder.record("a", torch.randn(1, 2, 3), (1, 2))
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


def test_a_runs_subject_tokens_are_the_masked_tokens_and_attend_as_the_mask_does():
    torch.manual_seed(0)
    neighbors = torch.randn(1, 6, 8)
    mask = torch.tensor([[True, False, True, False, False, True]])
    feats = DemoFeatures({"src": neighbors}, {"src": mask})
    subject, bias = feats.subject_neighbors("dst", {"dst": "src"})
    assert torch.equal(subject, neighbors[:, [0, 2, 5]]) and bias is None
    module = NeighborAttention(8, 8, heads=2, dim_head=4)
    torch.nn.init.normal_(module.to_out.weight)
    hidden = torch.randn(2, 5, 8)
    torch.testing.assert_close(module(hidden, subject), module(hidden, neighbors, mask), atol=1e-5, rtol=1e-5)
    none = DemoFeatures({"src": neighbors}, {"src": torch.zeros(1, 6, dtype=torch.bool)})
    assert none.subject_neighbors("dst", {"dst": "src"}) is None, "no subject token: no neighbors"
    assert DemoFeatures({"src": neighbors}).subject_neighbors("dst", {"dst": "src"})[0] is neighbors
    with pytest.raises(ValueError, match="groups"):
        DemoFeatures({"src": neighbors.expand(2, -1, -1)}, {"src": mask.expand(2, -1)}).subject_neighbors(
            "dst", {"dst": "src"})


# ---------------------------------------------------------------- per-demo weights


def test_parse_demo_weights_reads_one_number_per_demo_and_defaults_to_ones():
    from suti_core.demo_features import parse_demo_weights

    assert parse_demo_weights("", 3) == (1.0, 1.0, 1.0)
    assert parse_demo_weights("  \n ", 2) == (1.0, 1.0)
    assert parse_demo_weights("1, 0.5, 2", 3) == (1.0, 0.5, 2.0)
    assert parse_demo_weights("1\n0\n3e-1", 3) == (1.0, 0.0, 0.3)


@pytest.mark.parametrize(
    "text, count, fragment",
    [
        ("1, 1", 3, "3 demo images but 2 demo_weights"),
        ("1, 1, 1, 1", 3, "3 demo images but 4 demo_weights"),
        ("1,,1", 3, "3 demo images but 2 demo_weights"),
        ("1, -0.5, 1", 3, "entry 2 ('-0.5') must be a number >= 0"),
        ("1, much, 1", 3, "entry 2 ('much') is not a number"),
        ("nan, 1", 2, "entry 1 ('nan') must be a number >= 0"),
        ("inf, 1", 2, "entry 1 ('inf') must be a number >= 0"),
        ("0, 0", 2, "every demo_weights entry is 0"),
    ],
)
def test_parse_demo_weights_errors(text, count, fragment):
    from suti_core.demo_features import parse_demo_weights

    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_demo_weights(text, count)


def test_demo_logit_biases_are_log_weights_relative_to_the_largest():
    from suti_core.demo_features import demo_logit_biases

    assert demo_logit_biases([1.0, 1.0, 1.0]) is None, "equal weights: no bias at all"
    assert demo_logit_biases([0.5, 0.5]) is None
    assert demo_logit_biases([2.0, 1.0, 0.5]) == pytest.approx((0.0, math.log(0.5), math.log(0.25)))
    with pytest.raises(ValueError, match="kept_demos"):
        demo_logit_biases([1.0, 0.0])


def test_kept_demos_drops_the_weight_zero_demos():
    from suti_core.demo_features import Demonstration, kept_demos

    demos = [Demonstration(torch.zeros(1), torch.zeros(1), None, f"demo {w}", weight=w) for w in (1.0, 0.0, 2.0)]
    assert [d.caption for d in kept_demos(demos)] == ["demo 1.0", "demo 2.0"]
    assert Demonstration(torch.zeros(1), torch.zeros(1), None, "old").weight == 1.0, "old demos weigh 1"


def test_recorder_gives_every_token_its_demos_bias_and_subject_slices_match():
    recorder = FeatureRecorder(["a"])
    mask = torch.zeros(2, 2)
    mask[0] = 1.0  # top row: tokens 0, 1
    recorder.record("a", torch.randn(1, 4, 3), (2, 2), [None], [0.0])
    recorder.record("a", torch.randn(1, 4, 3), (2, 2), [mask], [-0.5])
    feats = recorder.features()
    assert torch.equal(feats.biases["a"], torch.tensor([[0.0] * 4 + [-0.5] * 4]))
    subject, bias = feats.subject_neighbors("dst", {"dst": "a"})
    assert subject.shape[1] == bias.shape[1] == 6
    assert torch.equal(bias, torch.tensor([[0.0] * 4 + [-0.5] * 2]))
    plain = FeatureRecorder(["a"])
    plain.record("a", torch.randn(2, 4, 3), (2, 2), None, [0.0, 0.0])
    assert plain.features().biases is None, "no bias when every demo weighs the same"
    assert plain.features().subject_neighbors("dst", {"dst": "a"})[1] is None
