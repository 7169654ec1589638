"""Texture transfer (suti_core/texture_transfer.py): the bank, the gate and the move of the denoised latent."""

from __future__ import annotations

import pytest
import torch

from suti_core import texture_transfer as tt


def striped(channels: int = 4, size: int = 12, phase: int = 0) -> torch.Tensor:
    """(1, C, size, size): vertical stripes one cell wide, +1 / -1 on every channel."""
    columns = (torch.arange(size) + phase) % 2 * 2.0 - 1.0
    return columns.expand(1, channels, size, size).clone()


def block_mask(size: int, start: int, stop: int, pixels_per_cell: int = 8) -> torch.Tensor:
    """(H, W) pixel mask covering latent cells [start, stop) in both directions."""
    mask = torch.zeros(size * pixels_per_cell, size * pixels_per_cell)
    mask[start * pixels_per_cell: stop * pixels_per_cell, start * pixels_per_cell: stop * pixels_per_cell] = 1.0
    return mask


def test_interior_keeps_the_cells_whose_whole_neighbourhood_is_inside():
    cells = torch.zeros(1, 8, 8, dtype=torch.bool)
    cells[0, 1:6, 1:6] = True
    inner = tt.interior(cells)
    expected = torch.zeros_like(cells)
    expected[0, 2:5, 2:5] = True
    assert torch.equal(inner, expected)
    assert tt.interior(torch.ones(1, 4, 4, dtype=torch.bool)).all(), "the image edge counts as inside"


def test_the_bank_holds_only_the_demos_interior_subject_cells():
    latent = torch.randn(1, 4, 12, 12)
    bank = tt.patch_bank([latent, latent], [block_mask(12, 2, 8), None])
    assert len(bank.patches) == 4 * 4 + 12 * 12  # 6x6 subject -> 4x4 interior; no mask: every cell
    assert bank.patches.shape[1] == 4 * tt.PATCH**2 and bank.centers.shape == (len(bank.patches), 4)
    assert torch.equal(bank.centers[0], latent[0, :, 3, 3]), "the first interior cell of the subject"
    assert tt.patch_bank([latent], [block_mask(12, 2, 4)]) is None, "a 2x2 subject has no interior cell"


def test_the_gate_is_the_interior_of_where_the_term_stands_out():
    norms = torch.full((2, 10 * 10), 0.1)
    norms.view(2, 10, 10)[0, 2:8, 2:8] = 1.0  # image 0: a 6x6 subject
    norms[1] += torch.linspace(0, 1e-3, 100)  # image 1: a flat map (no subject stands out) but for a faint ramp
    gate = tt.subject_gate(norms, (10, 10))
    assert gate.shape == (2, 1, 10, 10)
    assert gate[0, 0].sum() == 16 and gate[0, 0, 3:7, 3:7].all(), "the 4x4 interior of the subject"
    assert tt.subject_gate(torch.zeros(1, 16), (4, 4)).sum() == 0, "no term anywhere: nothing gated"


def test_the_gate_reads_the_median_where_suti_acts_so_a_region_keeps_its_own_background():
    norms = torch.zeros(1, 10 * 10)
    grid = norms.view(10, 10)
    grid[:, :5] = 0.4        # a region mask: SuTI acts on the left half only, less on its background
    grid[2:7, 0:4] = 1.0     # and strongly on its subject
    gate = tt.subject_gate(norms, (10, 10))[0, 0]
    expected = torch.zeros(10, 10)
    expected[3:6, 0:3] = 1.0  # the subject's interior (the image edge counts as inside); the rest of the region stays
    assert torch.equal(gate, expected)


def test_strength_zero_or_an_empty_gate_leave_the_latent_bit_for_bit():
    demo, target = striped(), torch.randn(2, 4, 12, 12)
    bank = tt.patch_bank([demo], [None])
    assert tt.transfer_texture(target, bank, torch.ones(2, 1, 12, 12), 0.0) is target
    assert torch.equal(tt.transfer_texture(target, bank, torch.zeros(2, 1, 12, 12), 1.0), target)


def test_a_latent_drawn_from_the_demo_patches_is_a_fixed_point():
    demo = striped()
    bank = tt.patch_bank([demo, striped(phase=1)], [None, None])
    assert torch.equal(tt.transfer_texture(demo, bank, torch.ones(1, 1, 12, 12), 1.0), demo)


def test_a_washed_out_pattern_moves_toward_the_demos_and_only_inside_the_gate():
    demo = striped()
    bank = tt.patch_bank([demo], [None])
    washed = 0.3 * striped(phase=1) + 0.05 * torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    gate = torch.zeros(1, 1, 12, 12)
    gate[..., 3:9, 3:9] = 1.0
    moved = tt.transfer_texture(washed, bank, gate, 0.5)
    inside, outside = gate.bool().expand_as(washed), ~gate.bool().expand_as(washed)
    truth = striped(phase=1)  # the washed-out latent's own phase: the nearest patches keep it
    assert torch.equal(moved[outside], washed[outside])
    assert (moved[inside] - truth[inside]).abs().mean() < 0.6 * (washed[inside] - truth[inside]).abs().mean()
    full = tt.transfer_texture(washed, bank, gate, 1.0)
    assert torch.equal(full[inside], truth[inside]), "strength 1: the nearest demo centres themselves"


def test_a_subject_faded_to_its_main_colour_takes_the_demos_share_of_the_pattern_back():
    # one column in four is the pattern's colour (+1), the rest the main colour (-1); the faded latent keeps only a
    # trace of the stripes, so every cell is nearest to a plain patch: a balanced assignment still gives a quarter
    # of the cells, the ones with the trace, the striped patches
    columns = torch.arange(12) % 4 == 0
    demo = torch.where(columns, 1.0, -1.0).expand(1, 4, 12, 12).clone()
    faded = torch.where(columns, -0.5, -0.6).expand(1, 4, 12, 12).clone()
    moved = tt.transfer_texture(faded, tt.patch_bank([demo], [None]), torch.ones(1, 1, 12, 12), 1.0)
    assert torch.equal(moved, demo)


def test_a_large_bank_is_thinned_evenly_to_the_budget(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    bank = tt.patch_bank([torch.randn(1, 4, 8, 8, generator=generator)], [None])
    queries = bank.patches[:10]  # each is a bank patch: with the whole bank it takes its own centre
    torch.testing.assert_close(tt.assign_patches(queries, bank), bank.centers[:10])
    monkeypatch.setattr(tt, "QUERY_BUDGET", 10 * 32)  # 64 patches -> every second one
    centers = tt.assign_patches(queries, bank)
    kept = {tuple(c.tolist()) for c in bank.centers[::2]}
    assert all(tuple(c.tolist()) in kept for c in centers)
    torch.testing.assert_close(centers[::2], bank.centers[:10:2])


def test_votes_are_the_subjects_best_match_against_the_rest():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # two subject tokens, one outside
    subject = torch.tensor([[True, True, False]])
    queries = torch.tensor([[[2.0, 0.1], [-3.0, 0.0], [0.0, 0.0]]])
    votes = tt.subject_votes(queries, tokens, subject)
    assert votes[0, 0] > 0 and votes[0, 1] < 0 and votes[0, 2] == 0, "a zero token matches nothing: not the subject"
    assert tt.subject_votes(queries, tokens, torch.ones(1, 3, dtype=torch.bool)) is None, "nothing outside: no votes"
    gate = tt.correspondence_gate(torch.tensor([[1.0] * 20 + [-1.0] * 5]), (5, 5))
    expected = torch.zeros(5, 5)
    expected[:3] = 1.0  # rows 0-3 voted the subject; the image edge counts as inside, row 3 borders row 4
    assert torch.equal(gate[0, 0], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents_come_back_in_their_dtype(dtype):
    bank = tt.patch_bank([striped()], [None])
    moved = tt.transfer_texture(striped(phase=1).to(dtype) * 0.3, bank, torch.ones(1, 1, 12, 12), 0.5)
    assert moved.dtype == dtype and torch.isfinite(moved.float()).all()


def test_the_step_strength_moves_an_euler_steps_next_latent_the_share_of_the_way():
    generator = torch.Generator().manual_seed(4)
    x, denoised, target = (torch.randn(1, 4, 6, 6, generator=generator, dtype=torch.float64) for _ in range(3))
    sigma, next_sigma, share = 2.0, 1.4, 0.5

    def euler(d: torch.Tensor) -> torch.Tensor:
        return x + (next_sigma - sigma) * (x - d) / sigma

    pulled = denoised + tt.step_strength(share, sigma, next_sigma) * (target - denoised)
    torch.testing.assert_close(euler(pulled) - euler(denoised), share * (target - denoised))
    assert tt.step_strength(share, sigma, 0.0) == share, "the last step ends the image the share of the way"
    assert tt.step_strength(share, sigma, None) == share, "no schedule: the denoised latent takes the share"
    assert tt.step_strength(share, sigma, sigma) == share
