"""SuTI Apply's texture transfer inside real ComfyUI: the subject map its patches note, the post-CFG step, and
the sampled result."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from test_comfy_apply import DEMO_SIZE, apply_suti, make_demos, randomize_adapter_, zero_adapter

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def suti(suti_pack):
    from comfyui_suti.nodes import adapter_patch, apply, demo_encoding, demos, layout, settings, texture
    from comfyui_suti.suti_core import adapter, demo_features, texture_transfer

    return SimpleNamespace(apply=apply, demos=demos, layout=layout, adapter_patch=adapter_patch, settings=settings,
                           demo_encoding=demo_encoding, adapter=adapter, demo_features=demo_features, texture=texture,
                           texture_transfer=texture_transfer)


def apply_with_texture(suti, tiny, demos, adapter, texture: float, end: float = 1.0,
                       attn_mask: torch.Tensor | None = None):
    return apply_suti(suti, tiny.model, demos, adapter, end=end, apply_to="cond only", attn_mask=attn_mask,
                      texture_transfer=texture)


def centre_square(size: int = 128) -> torch.Tensor:
    """A MASK white in its middle half (in each direction) and dark grey elsewhere: SuTI acts everywhere, most in
    the middle, so the subject map has a subject there."""
    mask = torch.full((size, size), 0.2)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return mask


def post_cfg_functions(model) -> list:
    return model.model_options.get("sampler_post_cfg_function", [])


def block_options(latent_grid: tuple[int, int], grid: tuple[int, int], cond_or_uncond: list[int],
                  block: tuple[str, int] = ("input", 1)) -> dict:
    return {"activations_shape": [1, 8, *grid], "original_shape": [2, 4, *latent_grid],
            "cond_or_uncond": cond_or_uncond, "block": block, "block_index": 0}


def test_subject_map_notes_the_cond_rows_of_full_resolution_blocks_once_a_step(suti):
    subject_map = suti.texture.SubjectMap()
    term = torch.zeros(4, 16, 8)  # [uncond of images 0 and 1, cond of images 0 and 1] at a 4x4 grid
    term[0, 5] = 9.0  # image 0's uncond: not noted
    term[2, 5] = 3.0  # image 0's cond, token 5
    term[3, 6] = 4.0  # image 1's cond, token 6
    subject_map.record(term, block_options((4, 4), (4, 4), [1, 0]))
    subject_map.record(term, block_options((4, 4), (4, 4), [1, 0], ("output", 9)))  # a second full-size block
    subject_map.record(torch.ones(4, 4, 8), block_options((4, 4), (2, 2), [1, 0]))  # a coarser block: not noted
    subject_map.record(7 * term, block_options((4, 4), (4, 4), [0]))  # an extra pass (SAG's, PAG's): not noted
    subject_map.record(7 * term[:2], block_options((4, 4), (4, 4), [1], ("output", 10)))  # no cond rows
    norms = torch.zeros(2, 16)
    norms[0, 5], norms[1, 6] = 2 * 3.0 * 8**0.5, 2 * 4.0 * 8**0.5
    expected = suti.texture_transfer.subject_gate(norms, (4, 4))
    torch.testing.assert_close(subject_map.take((4, 4)), expected)
    assert subject_map.take((4, 4)) is None, "take empties the map"
    subject_map.record(term, block_options((4, 4), (4, 4), [1, 0]))
    assert subject_map.take((4, 4)) is None, "until the next step starts, the main pass's blocks are seen"
    subject_map.start()
    subject_map.record(term, block_options((4, 4), (4, 4), [1, 0]))
    torch.testing.assert_close(subject_map.take((4, 4)), suti.texture_transfer.subject_gate(norms / 2, (4, 4)))


def test_with_demo_masks_the_map_is_where_the_blocks_vote_for_the_subject(suti):
    subject_map = suti.texture.SubjectMap(by_correspondence=True)
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # a demo token of the subject, one of its background
    subject = torch.tensor([[True, False]])
    hidden = torch.tensor([0.0, 1.0]).repeat(2, 25, 1)  # [uncond, cond] of one image at 5x5: background-like
    hidden[1, :15] = torch.tensor([1.0, 0.1])  # the cond row's first three rows are subject-like
    subject_map.record(torch.ones(2, 25, 2), block_options((5, 5), (5, 5), [1, 0]))  # the term: ignored here
    subject_map.record_votes(hidden, tokens, subject, block_options((5, 5), (5, 5), [1, 0]))
    subject_map.record_votes(-hidden, tokens, subject, block_options((5, 5), (5, 5), [1, 0]))  # seen: not noted
    expected = torch.zeros(1, 1, 5, 5)
    expected[..., :2, :] = 1.0  # the interior of the subject-like rows (the image edge counts as inside)
    assert torch.equal(subject_map.take((5, 5)), expected)


def test_a_map_read_below_the_latents_size_is_stretched_to_it(suti):
    subject_map = suti.texture.SubjectMap(level=1)  # SDXL: the finest transformer blocks at half the latent's size
    term = torch.zeros(1, 9, 4)
    term[0, 4] = 1.0  # the middle of a 3x3 grid, the halving of a 5x5 latent
    subject_map.record(term, block_options((5, 5), (5, 5), [0]))  # a block at the latent's size: none in SDXL
    assert subject_map.take((5, 5)) is None
    subject_map.start()
    subject_map.record(term, block_options((5, 5), (3, 3), [0]))
    gate = suti.texture_transfer.subject_gate(term.norm(dim=-1), (3, 3))
    assert torch.equal(subject_map.take((5, 5)), torch.nn.functional.interpolate(gate, size=(5, 5), mode="nearest"))


def test_the_correspondence_patch_notes_where_suti_acts_and_only_inside_its_region(suti, tiny_sd15, tiny_vae):
    demos, adapter = make_demos(suti, tiny_sd15, tiny_vae), zero_adapter(suti, tiny_sd15)
    region = torch.zeros(64, 64)
    region[:, :32] = 1.0  # the left half of the image
    patched = apply_with_texture(suti, tiny_sd15, demos, adapter, 0.5, end=0.8, attn_mask=region)
    note = [p for p in patched.model_options["transformer_options"]["patches"]["attn1_patch"]
            if isinstance(p, suti.texture.NoteSubjectCorrespondence)]
    assert len(note) == 1
    note, settings = note[0], note[0].settings
    key = next(iter(settings.block_map))
    source = settings.block_map[key]
    features = suti.demo_features.DemoFeatures({source: torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])},
                                               masks={source: torch.tensor([[True, False]])})
    run = suti.settings.RunNeighbors(features, {}, subject_map=suti.texture.SubjectMap(by_correspondence=True))
    name, block_id, index = suti.demo_features.parse_block_key(key)
    hidden = torch.tensor([1.0, 0.1]).repeat(1, 16, 1)  # every token subject-like, on a 4x4 grid

    def noted(sigma: float) -> torch.Tensor | None:
        options = {**block_options((4, 4), (4, 4), [0], (name, block_id)), "block_index": index,
                   "sigmas": torch.tensor([sigma]), settings.features_key: run}
        run.subject_map.start()
        out = note(hidden, hidden, hidden, options)
        assert out[0] is hidden, "the attention's own input is left as it is"
        return run.subject_map.take((4, 4))

    gate = noted(settings.texture_sigma)
    assert gate is not None and gate[0, 0, :, :1].all() and not gate[0, 0, :, 2:].any(), "only the left half"
    assert noted(settings.sigma_end / 2) is None, "after end_percent SuTI does not act: nothing is noted"


def test_texture_transfer_is_installed_only_when_on_and_checks_its_range(suti, tiny_sd15, tiny_vae):
    demos, adapter = make_demos(suti, tiny_sd15, tiny_vae), zero_adapter(suti, tiny_sd15)
    assert post_cfg_functions(apply_with_texture(suti, tiny_sd15, demos, adapter, 0.0)) == []
    on = post_cfg_functions(apply_with_texture(suti, tiny_sd15, demos, adapter, 0.5))
    assert len(on) == 1 and isinstance(on[0], suti.texture.TextureTransfer) and on[0].settings.texture == 0.5
    assert post_cfg_functions(tiny_sd15.model) == [], "the input model stays as it is"
    with pytest.raises(ValueError, match=r"texture_transfer 1.5 is outside 0..1"):
        apply_with_texture(suti, tiny_sd15, demos, adapter, 1.5)


def _step_args(transfer, run, denoised: torch.Tensor, sigma: float, sigmas: torch.Tensor | None = None) -> dict:
    options = {"transformer_options": {transfer.settings.features_key: run}}
    if sigmas is not None:
        options["transformer_options"]["sample_sigmas"] = sigmas
    return {"denoised": denoised, "sigma": torch.tensor([sigma]), "model_options": options}


def test_the_post_cfg_step_moves_only_the_marked_subjects_interior_and_only_late(suti, tiny_sd15, tiny_vae):
    demos, adapter = make_demos(suti, tiny_sd15, tiny_vae), zero_adapter(suti, tiny_sd15)
    transfer = post_cfg_functions(apply_with_texture(suti, tiny_sd15, demos, adapter, 0.5))[0]
    bank = suti.texture_transfer.patch_bank([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))],
                                            [None])
    run = suti.settings.RunNeighbors(suti.demo_features.DemoFeatures({}), {}, bank=bank,
                                     subject_map=suti.texture.SubjectMap())
    denoised = torch.randn(1, 4, 8, 8)
    term = torch.full((1, 64, 8), 0.1)  # SuTI acts a little everywhere
    term.view(1, 8, 8, 8)[0, 1:6, 1:6] = 1.0  # and most on a 5x5 subject: its 3x3 interior is moved

    def step(sigma: float, sigmas: torch.Tensor | None = None) -> torch.Tensor:
        run.subject_map.start()
        run.subject_map.record(term, block_options((8, 8), (8, 8), [0]))
        return transfer(_step_args(transfer, run, denoised, sigma, sigmas))

    early = step(transfer.settings.texture_sigma * 1.01)
    assert torch.equal(early, denoised), "early: nothing moves"
    assert run.subject_map.take((8, 8)) is None, "the map is used up"
    changed = (step(transfer.settings.texture_sigma) != denoised).any(dim=1)[0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:5, 2:5] = True
    assert torch.equal(changed, expected)
    assert torch.equal(transfer(_step_args(transfer, run, denoised, 0.0)), denoised), "no map this step: no move"
    sigma = transfer.settings.texture_sigma
    sigmas = torch.tensor([2 * sigma, sigma, 0.6 * sigma, 0.0])
    gate = expected[None, None].float()
    for at, strength in ((sigma, 0.5 / 0.4), (0.6 * sigma, 0.5)):  # the schedule's next sigma sets the pull
        want = suti.texture_transfer.transfer_texture(denoised, bank, gate, strength)
        torch.testing.assert_close(step(at, sigmas), want)


@pytest.mark.parametrize("mode", ["adapter", "training-free"])
def test_sampling_with_texture_transfer_changes_the_result_only_where_suti_acts_late(suti, tiny_sd15, tiny_vae, mode):
    demos, adapter = make_demos(suti, tiny_sd15, tiny_vae), None
    if mode == "adapter":
        adapter = zero_adapter(suti, tiny_sd15)
        randomize_adapter_(adapter)

    def sample(texture: float, end: float = 1.0) -> torch.Tensor:
        # a random model's SuTI term marks no subject of its own; the region mask gives the map one
        patched = apply_with_texture(suti, tiny_sd15, demos, adapter, texture, end, attn_mask=centre_square())
        return tiny_sd15.sample(model=patched, steps=4)

    off = sample(0.0)
    on = sample(1.0)
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    assert torch.equal(sample(1.0, end=0.3), sample(0.0, end=0.3)), "SuTI off in the late half: no subject map"


def test_without_demo_masks_a_zero_adapter_marks_nothing_so_texture_transfer_changes_nothing(suti, tiny_sd15, tiny_vae):
    demos, adapter = make_demos(suti, tiny_sd15, tiny_vae), zero_adapter(suti, tiny_sd15)
    patched = apply_with_texture(suti, tiny_sd15, demos, adapter, 1.0)
    assert torch.equal(tiny_sd15.sample(model=patched, steps=4), tiny_sd15.sample(steps=4))


def test_with_demo_masks_the_subject_is_found_without_suti_s_term(suti, tiny_sd15, tiny_vae):
    images = torch.rand(3, 72, 56, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, 72, 56)
    masks[:, 16:56, 12:44] = 1.0  # each demo's subject: a box in the middle
    captions = "\n".join(["a photo of sks dog"] * 3)
    demos = suti.demos.SuTIDemonstrations.execute(images, captions, tiny_vae, tiny_sd15.clip, DEMO_SIZE,
                                                  subject_masks=masks).result[0]
    adapter = zero_adapter(suti, tiny_sd15)  # its term is zero everywhere, so it marks no subject itself

    def sample(texture: float) -> torch.Tensor:
        return tiny_sd15.sample(model=apply_with_texture(suti, tiny_sd15, demos, adapter, texture), steps=4)

    assert not torch.equal(sample(1.0), sample(0.0)), "the votes against the demos' masks found subject cells"


def test_on_sdxl_the_map_is_read_at_half_the_latent_size_while_sampling(suti, tiny_sdxl, tiny_vae, monkeypatch):
    # SDXL's first level has no transformer blocks: the votes come from the blocks at half the latent's size and
    # the gate is stretched to the latent
    images = torch.rand(3, 72, 56, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, 72, 56)
    masks[:, 22:50, 14:42] = 1.0  # the middle half of the square crop: the votes have a subject and a background
    captions = "\n".join(["a photo of sks dog"] * 3)
    demos = suti.demos.SuTIDemonstrations.execute(images, captions, tiny_vae, tiny_sdxl.clip, DEMO_SIZE,
                                                  subject_masks=masks).result[0]
    gates = []
    take = suti.texture.SubjectMap.take
    monkeypatch.setattr(suti.texture.SubjectMap, "take", lambda self, grid: gates.append(take(self, grid)) or gates[-1])
    tiny_sdxl.sample(model=apply_with_texture(suti, tiny_sdxl, demos, zero_adapter(suti, tiny_sdxl), 1.0), steps=4)
    noted = [gate for gate in gates if gate is not None]
    assert noted and all(gate.shape == (1, 1, 16, 16) for gate in noted), "late steps have a map, at the latent's size"
