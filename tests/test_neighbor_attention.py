"""NeighborAttention and the attention backend: zero-init identity, shapes, masks, batching."""

import math

import pytest
import torch
from torch import nn

from suti_core.attention_backend import attention, attention_backend_name
from suti_core.neighbor_attention import PROMPT_LOGIT, NeighborAttention


def _randomise(module: NeighborAttention, seed: int = 0) -> NeighborAttention:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


def test_zero_init_output_projection_makes_delta_exactly_zero():
    attn = NeighborAttention(query_dim=16, neighbor_dim=24, heads=2, dim_head=8)
    hidden, neighbors = torch.randn(2, 10, 16), torch.randn(1, 30, 24)
    delta = attn(hidden, neighbors)
    assert torch.equal(delta, torch.zeros_like(hidden))
    assert torch.equal(hidden + delta, hidden), "untrained adapter must be bit-identical"


def test_non_zero_weights_change_output():
    attn = _randomise(NeighborAttention(16, 24, 2, 8))
    delta = attn(torch.randn(2, 10, 16), torch.randn(1, 30, 24))
    assert delta.shape == (2, 10, 16)
    assert delta.abs().max() > 0


def test_neighbors_batch_one_broadcasts_like_repeated_neighbors():
    attn = _randomise(NeighborAttention(16, 16, 4, 4))
    hidden, neighbors = torch.randn(3, 5, 16), torch.randn(1, 7, 16)
    torch.testing.assert_close(attn(hidden, neighbors), attn(hidden, neighbors.expand(3, -1, -1)))


def test_each_batch_row_uses_its_own_neighbors():
    attn = _randomise(NeighborAttention(16, 16, 4, 4))
    hidden, neighbors = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    both = attn(hidden, neighbors)
    torch.testing.assert_close(both[1:], attn(hidden[1:], neighbors[1:]))


def test_mask_hides_neighbor_tokens():
    attn = _randomise(NeighborAttention(8, 8, 2, 4))
    hidden, neighbors = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    torch.testing.assert_close(attn(hidden, neighbors, mask), attn(hidden, neighbors[:, :3]))


def test_row_without_any_neighbor_gets_no_update():
    attn = _randomise(NeighborAttention(8, 8, 2, 4))
    mask = torch.tensor([[True, True], [False, False]])
    delta = attn(torch.randn(2, 3, 8), torch.randn(2, 2, 8), mask)
    assert torch.isfinite(delta).all()
    assert torch.equal(delta[1], torch.zeros_like(delta[1]))


def test_an_adapter_reading_the_prompt_can_take_a_prompt_token_over_the_demos():
    """A prompt token whose key a query prefers gives that query the token's value, whatever the demos hold; with
    zero prompt projections the prompt's tokens are value-0 keys at PROMPT_LOGIT beside the demos (masks and demo
    weights still act), and a row without any demo neighbor still gets no update."""
    generator = torch.Generator().manual_seed(7)
    attn = _randomise(NeighborAttention(8, 8, 2, 4, prompt_dim=6))
    query, neighbors = torch.randn(1, 1, 8, generator=generator), torch.randn(1, 5, 8, generator=generator)
    prompt = torch.zeros(1, 3, 6)
    prompt[0, 1, 0] = 1.0  # token 1 alone is not zero
    with torch.no_grad():
        attn.to_k_prompt.weight[:, 0] = 1e3 * attn.to_q(attn.norm(query))[0, 0]  # in each head, token 1 dominates
    delta = attn(query, neighbors, prompt=prompt)
    torch.testing.assert_close(delta, attn.to_out(attn.to_v_prompt.weight[:, 0])[None, None])
    torch.testing.assert_close(attn(query, neighbors * 3, prompt=prompt), delta)

    plain = _randomise(NeighborAttention(8, 8, 2, 4))
    reading = NeighborAttention(8, 8, 2, 4, prompt_dim=6)
    reading.load_state_dict(plain.state_dict() | {"to_k_prompt.weight": torch.zeros(8, 6),
                                                  "to_v_prompt.weight": torch.zeros(8, 6)})
    hidden, prompts = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 4, 6, generator=generator)
    mask = torch.tensor([[True, True, False, True, False]])
    bias = torch.tensor([[0.0, 0.7, 0.0, -0.3, 0.0]])
    k, v = plain.neighbor_kv(neighbors)
    zeros = torch.zeros(2, 4, 8)
    offsets = torch.full((1, 4), PROMPT_LOGIT)
    expected = plain.attend(hidden, (torch.cat([k.expand(2, -1, -1), zeros], 1), torch.cat([v.expand(2, -1, -1), zeros], 1)),
                            neighbor_bias=torch.cat([torch.where(mask, bias, float("-inf")), offsets], 1))
    torch.testing.assert_close(reading.attend(hidden, reading.neighbor_kv(neighbors), mask, neighbor_bias=bias,
                                              prompt=prompts), expected)
    nothing = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.equal(reading(hidden, neighbors.expand(2, -1, -1), nothing, prompt=prompts), torch.zeros_like(hidden))
    with pytest.raises(ValueError, match="also attends to the prompt: pass its tokens"):
        reading(hidden, neighbors)


@pytest.mark.parametrize(
    "hidden, neighbors, mask, fragment",
    [
        ((2, 5, 15), (1, 7, 24), None, "hidden must be (B, N, 16), got (2, 5, 15)"),
        ((2, 5, 16), (1, 7, 16), None, "neighbors must be (B or 1, M, 24), got (1, 7, 16)"),
        ((2, 5, 16), (3, 7, 24), None, "neighbors batch 3 must be 1 or match hidden batch 2"),
        ((2, 5, 16), (1, 7, 24), (2, 6), "neighbor_mask must be (B or 1, 7) bool, got (2, 6)"),
    ],
)
def test_shape_errors_name_the_shapes(hidden, neighbors, mask, fragment):
    attn = NeighborAttention(16, 24, 2, 8)
    mask_tensor = None if mask is None else torch.ones(mask, dtype=torch.bool)
    with pytest.raises(ValueError) as err:
        attn(torch.randn(hidden), torch.randn(neighbors), mask_tensor)
    assert fragment in str(err.value)


def test_sdpa_backend_on_cpu_matches_reference_softmax_attention():
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    assert attention_backend_name("cpu") == "sdpa"
    heads = 2
    qh, kh, vh = (t.view(2, -1, heads, 4).transpose(1, 2) for t in (q, k, v))
    ref = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, dim=-1) @ vh  # scale 1/sqrt(4)
    torch.testing.assert_close(attention(q, k, v, heads), ref.transpose(1, 2).reshape(2, 5, 8))


def test_attention_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        attention(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8), heads=3)


def test_neighbor_delta_weights_rows_and_skips_the_zero_ones():
    from suti_core.neighbor_attention import neighbor_delta

    torch.manual_seed(0)
    module = NeighborAttention(8, 6, heads=2, dim_head=4)
    nn.init.normal_(module.to_out.weight)
    hidden, neighbors = torch.randn(3, 5, 8), torch.randn(1, 7, 6)
    kv = module.neighbor_kv(neighbors)
    full = module(hidden, neighbors)
    delta = neighbor_delta(module, hidden, kv, torch.tensor([0.0, 2.0, 0.5]))
    torch.testing.assert_close(delta, full * torch.tensor([0.0, 2.0, 0.5])[:, None, None])
    assert torch.equal(delta[0], torch.zeros_like(delta[0])), "a row of weight 0 is not computed"
    assert neighbor_delta(module, hidden, kv, torch.zeros(3)) is None


def _share_of_first(bias: torch.Tensor | None, first: int = 3) -> torch.Tensor:
    """Attention share (B, N) of the first `first` keys: their values are 1 in channel 0, the others' 0."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 9, 8, generator=gen)
    v = torch.zeros(2, 9, 8)
    v[:, :first] = 1.0  # every head's channel 0 ... sees the indicator
    return attention(q, k, v, heads=2, mask=bias)[..., 0]


def test_log_weight_bias_doubles_the_weighted_demos_share_before_renormalisation():
    share = _share_of_first(None)
    bias = torch.zeros(1, 9)
    bias[:, :3] = math.log(2.0)  # demo A (tokens 0-2) weighs 2, demo B weighs 1
    doubled = _share_of_first(bias)
    assert bool((doubled > share).all()), "weight 2 must raise demo A's attention share"
    torch.testing.assert_close(doubled, 2 * share / (2 * share + (1 - share)))
    torch.testing.assert_close(_share_of_first(torch.full((1, 9), -0.7)), share, atol=1e-6, rtol=0)


def test_neighbor_bias_combines_with_the_mask_and_matches_dropping_tokens():
    module = _randomise(NeighborAttention(8, 6, heads=2, dim_head=4))
    hidden, neighbors = torch.randn(2, 5, 8), torch.randn(1, 7, 6)
    bias = torch.tensor([[0.0, 0.0, 0.0, -0.4, -0.4, -0.4, -0.4]])
    mask = torch.tensor([[True, False, True, True, True, False, True]])
    both = module.attend(hidden, module.neighbor_kv(neighbors), mask, neighbor_bias=bias)
    kept = module.attend(hidden, module.neighbor_kv(neighbors[:, mask[0]]), neighbor_bias=bias[:, mask[0]])
    torch.testing.assert_close(both, kept)
    with pytest.raises(ValueError, match=r"neighbor_bias must be \(1, M\)"):
        module.attend(hidden, module.neighbor_kv(neighbors), neighbor_bias=bias.expand(2, -1))
