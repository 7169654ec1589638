"""Texture transfer: over the last steps, the subject's denoised latent takes a share of the demos' patches.

The neighbor attention carries a subject's colours, but a fine pattern (stripes, dots, checks one or two latent
cells wide) washes out over a small base's last steps even when the attention saw it. So late in sampling, each
latent cell marked as the subject is pulled toward the centre of a demo patch (PATCH x PATCH latent cells, taken
inside the demos' subjects): non-parametric texture synthesis (Efros & Leung) on the denoised latent, only where
the subject is.

Where the subject is: with demo subject masks, each token of the blocks at the latent's own resolution is the
subject when its nearest demo token (cosine of the UNet's own features, which carry semantic correspondence, as in
Tang et al. 2023, "Emergent Correspondence from Image Diffusion") lies inside a demo's subject rather than outside
it, the votes summed over those blocks (`subject_votes`, `correspondence_gate`). Without masks there is nothing
outside a subject to compare with, so the size of SuTI's own term per token stands in (`subject_gate`).

Which patch: a nearest-patch search lets a washed-out subject pick the demos' plainest patches (a region faded to
its main colour is nearest to the plain parts of the demos), which keeps it washed out. So the cells of an image
and the bank's patches are matched by entropic optimal transport with equal mass on both sides
(`assign_patches`): every patch is used about as often as any other, so the subject takes the demos' share of
each colour and of the pattern, and each cell still takes a patch near its own neighbourhood.

Both the bank and the gate keep only interior cells (all PATCH x PATCH neighbours inside), so the subject's
outline, and everything outside it, stays as the model drew it.

The share is what each late step's *sampler latent* takes (`step_strength`): an Euler step passes only
1 - sigma_next / sigma of a change of the denoised latent on to the next latent, so the denoised latent is pulled
by share / (1 - sigma_next / sigma). The model then denoises a latent that already carries the demo texture and
draws around it, and the last step (sigma_next = 0) ends the subject `share` of the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATCH = 3
GATE_CONTRAST = 0.25   # a cell is the subject where its term is this far from the image's median toward its max
QUERY_BUDGET = 2**22   # pairs held at once: cells x bank patches (a larger bank is thinned), tokens x demo tokens
TRANSPORT_BLUR = 0.05  # entropic regularisation of the assignment, as a share of the median patch distance
TRANSPORT_ITERATIONS = 50


@dataclass(frozen=True)
class PatchBank:
    """The demos' subject patches (M, C * PATCH**2) in the model's latent space, and their centre cells (M, C)."""

    patches: torch.Tensor
    centers: torch.Tensor


def latent_patches(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C * PATCH**2): each cell's neighbourhood (edges repeated)."""
    padded = F.pad(latents, (PATCH // 2,) * 4, mode="replicate")
    return F.unfold(padded, PATCH).transpose(1, 2)


def interior(cells: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool -> the cells whose PATCH x PATCH neighbourhood is all True (the image edge counts as True)."""
    return -F.max_pool2d(-cells[:, None].float(), PATCH, 1, PATCH // 2)[:, 0] > 0.5


def patch_bank(latents: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> PatchBank | None:
    """The bank of the demos' interior subject cells: `latents` (1, C, h, w) each, in the model's latent space;
    `masks` (H, W) in [0, 1] or None (the whole demo). None when no demo has an interior subject cell."""
    patches, centers = [], []
    for latent, mask in zip(latents, masks, strict=True):
        latent = latent.float()
        grid = latent.shape[-2:]
        if mask is None:
            cells = torch.ones(1, *grid, dtype=torch.bool)
        else:
            cells = F.adaptive_avg_pool2d(mask[None, None].float(), grid)[:, 0] > 0.5  # (1, h, w)
        keep = interior(cells).flatten().to(latent.device)
        patches.append(latent_patches(latent)[0][keep])
        centers.append(latent[0].flatten(1).T[keep])
    if sum(len(p) for p in patches) == 0:
        return None
    return PatchBank(torch.cat(patches), torch.cat(centers))


def subject_gate(term_norms: torch.Tensor, grid: tuple[int, int], contrast: float = GATE_CONTRAST) -> torch.Tensor:
    """(B, h*w) size of SuTI's term per token -> (B, 1, h, w) in {0, 1}: the interior of the cells at least
    `contrast` of the way from the median term (the background's, which covers most of where SuTI acts) to the
    largest (the subject's). The median is taken over the cells SuTI acts on (term > 0), so a region mask that
    zeroes the rest of the image does not make its own background look like the subject."""
    acting = torch.where(term_norms > 0, term_norms, torch.full_like(term_norms, float("nan")))
    median = acting.nanmedian(dim=1, keepdim=True).values  # NaN where SuTI acts nowhere: nothing is gated
    peak = term_norms.amax(dim=1, keepdim=True)
    scaled = (term_norms - median) / (peak - median).clamp_min(torch.finfo(term_norms.dtype).tiny)
    cells = (scaled >= contrast).view(-1, *grid)
    return interior(cells)[:, None].float()


def subject_votes(queries: torch.Tensor, tokens: torch.Tensor, subject: torch.Tensor) -> torch.Tensor | None:
    """queries (B, N, C) of a block, the demos' tokens (1, M, C) of its source and which are a subject's (1, M)
    -> (B, N): the best cosine among the subject's tokens minus the best among the rest (> 0: the subject), or
    None when the demos have no token on one side."""
    subject = subject[0].to(queries.device)
    if bool(subject.all()) or not bool(subject.any()):
        return None
    references = F.normalize(tokens[0].float(), dim=-1).to(queries.device)
    inside, outside = references[subject].T, references[~subject].T
    queries = F.normalize(queries.float(), dim=-1)
    chunk = max(1, QUERY_BUDGET // len(references))  # query tokens whose cosines are held at once
    return torch.cat([(part @ inside).amax(dim=-1) - (part @ outside).amax(dim=-1)
                      for part in queries.split(chunk, dim=1)], dim=1)


def correspondence_gate(votes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w) summed `subject_votes` -> (B, 1, h, w) in {0, 1}: the interior of the cells voted the subject."""
    return interior((votes > 0).view(-1, *grid))[:, None].float()


def assign_patches(queries: torch.Tensor, bank: PatchBank) -> torch.Tensor:
    """(K, C * PATCH**2) neighbourhoods of one image -> (K, C): each one's bank centre under an entropic optimal
    transport with equal mass per cell and per patch (log-domain Sinkhorn; each cell takes the patch its transport
    plan favours, argmin of distance minus the patch's dual potential), so over the image every patch is used
    about equally often."""
    patches, centers = bank.patches.to(queries), bank.centers.to(queries)
    stride = -(-len(queries) * len(patches) // QUERY_BUDGET)
    patches, centers = patches[::stride], centers[::stride]
    cost = torch.cdist(queries, patches).square()  # (K, M)
    blur = TRANSPORT_BLUR * cost.median().clamp_min(torch.finfo(cost.dtype).tiny)
    potential = torch.zeros(len(patches), dtype=cost.dtype, device=cost.device)
    for _ in range(TRANSPORT_ITERATIONS):  # uniform marginals: the constant log K, log M terms cancel in argmin
        rows = -blur * torch.logsumexp((potential - cost) / blur, dim=1)
        potential = -blur * torch.logsumexp((rows[:, None] - cost) / blur, dim=0)
    return centers[(cost - potential).argmin(dim=1)]


def step_strength(share: float, sigma: float, next_sigma: float | None) -> float:
    """The pull on a step's denoised latent that moves the sampler's next latent `share` of the way to the target
    (exact for Euler: x' = D + next_sigma / sigma * (x - D)); `share` itself at the last step (next_sigma 0) and
    where the next sigma is unknown or not below this one."""
    if next_sigma is None or not 0.0 <= next_sigma < sigma:
        return share
    return share / (1.0 - next_sigma / sigma)


def transfer_texture(denoised: torch.Tensor, bank: PatchBank, gate: torch.Tensor, strength: float) -> torch.Tensor:
    """denoised (B, C, h, w) + strength * gate * (assigned demo centre - denoised) (`assign_patches`), computed
    in float32 for the gated cells only; the rest of the latent is returned bit for bit."""
    b, c, h, w = denoised.shape
    where = gate.flatten(1) > 0  # (B, h*w)
    if strength == 0.0 or not where.any():
        return denoised
    latent = denoised.float()
    queries = latent_patches(latent)  # (B, h*w, C * PATCH**2)
    cells = latent.permute(0, 2, 3, 1).reshape(b, h * w, c)
    moved = cells.clone()
    for row in range(b):  # each image's subject is matched to the whole bank on its own
        inside = where[row]
        if inside.any():
            target = assign_patches(queries[row][inside], bank)
            moved[row][inside] = cells[row][inside] + strength * (target - cells[row][inside])
    return moved.view(b, h, w, c).permute(0, 3, 1, 2).to(denoised.dtype)
