"""DreamBench-style metrics on the procedural world, judged by the `Judge` CNN.

Convention: images are float tensors (B, 3, S, S) in [-1, 1] (the world sampler's and the toy
autoencoder's range; ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1] convert with `from_comfy_image`).
S may be 64 or 128 (any multiple of 64); the judge downsamples inside.

- subject fidelity: cosine between the identity embedding of an image and the mean identity embedding
  of the subject's real renders in plain photo contexts (DINO analogue);
- text fidelity: per attribute, does the judge see what the prompt asked (CLIP-T analogue);
- image quality: L1 distance to the exact rendered target at 32×32 (see `image_quality`).
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..world import Context, Subject, demo_contexts, render, subject_from_id
from .judge import EQUAL_AREA_PATTERNS, HEADS, IDENTITY_HEADS, IGNORE, Judge, labels_for, load_judge

DEFAULT_JUDGE = Path(__file__).resolve().parents[2] / "models/eval/judge.safetensors"
TEXT_ATTRIBUTES = ("shape", "background", "position", "scale", "style", "recolor", "accessory", "state")
QUALITY_SIZE = 32  # image_quality's comparison resolution


@lru_cache(maxsize=2)
def default_judge(path: str = str(DEFAULT_JUDGE)) -> Judge:
    """The shipped judge (cached)."""
    return load_judge(path)


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (S, S, 3) arrays -> float (B, 3, S, S) in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def from_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, 3) in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() * 2.0 - 1.0


def render_truth(subjects: Sequence[Subject], contexts: Sequence[Context], seeds: Sequence[int] | None = None,
                 size: int = 128) -> torch.Tensor:
    """Renderer truth for (subject, context, seed) triples as (B, 3, size, size) in [-1, 1]."""
    seeds = seeds if seeds is not None else [0] * len(subjects)
    return to_tensor([render(s, c, size, int(seed)) for s, c, seed in zip(subjects, contexts, seeds)])


@torch.no_grad()
def judge_logits(images: torch.Tensor, judge: Judge | None = None, chunk: int = 256) -> dict[str, torch.Tensor]:
    """{head: (B, n_classes)} logits, computed in chunks."""
    judge = judge or default_judge()
    parts = [judge(images[i: i + chunk]) for i in range(0, len(images), chunk)]
    return {h: torch.cat([p[h] for p in parts]) for h in HEADS}


def identity_embedding(images: torch.Tensor, judge: Judge | None = None) -> torch.Tensor:
    """(B, D): L2-normalised concatenation of the identity heads' softmax probabilities (D = 33)."""
    logits = judge_logits(images, judge)
    probs = torch.cat([logits[h].softmax(dim=-1) for h in IDENTITY_HEADS], dim=-1)  # (B, D)
    return F.normalize(probs, dim=-1)


def reference_renders(subject: Subject | int, n: int = 8, size: int = 128) -> torch.Tensor:
    """(n, 3, size, size): the subject's real renders in plain photo contexts, seeded by its id."""
    subject = subject_from_id(subject) if isinstance(subject, int) else subject
    contexts = demo_contexts(n, seed=subject.id)
    return render_truth([subject] * n, contexts, [subject.id * 1000 + i for i in range(n)], size)


def reference_embedding(references: torch.Tensor, judge: Judge | None = None) -> torch.Tensor:
    """(D,) mean identity embedding of one subject's reference renders (R, 3, S, S)."""
    return identity_embedding(references, judge).mean(dim=0)


def subject_fidelity(generated: torch.Tensor, references: Sequence[int | Subject] | Sequence[torch.Tensor],
                     judge: Judge | None = None) -> torch.Tensor:
    """(B,) cosine between each generated image's identity embedding and its subject's mean reference embedding.

    `references[i]` is a subject (id or Subject; its reference renders are made here) or a tensor
    (R, 3, S, S) of that subject's real renders.
    """
    if len(references) != len(generated):
        raise ValueError(f"{len(generated)} generated images but {len(references)} references")
    emb = identity_embedding(generated, judge)  # (B, D)
    cache: dict[int, torch.Tensor] = {}
    refs = []
    for ref in references:
        if isinstance(ref, torch.Tensor):
            refs.append(reference_embedding(ref, judge))
            continue
        sid = ref if isinstance(ref, int) else ref.id
        if sid not in cache:
            cache[sid] = reference_embedding(reference_renders(sid), judge)
        refs.append(cache[sid])
    return F.cosine_similarity(emb, torch.stack(refs), dim=-1)


def text_fidelity(generated: torch.Tensor, contexts: Sequence[Context], shapes: Sequence[str],
                  judge: Judge | None = None) -> dict[str, torch.Tensor]:
    """{attribute: (B,) 1.0 / 0.0 = the judge sees what the prompt asked; NaN where the attribute does not apply}.

    Attributes: TEXT_ATTRIBUTES. "recolor" applies only to prompts that ask a colour in a style that shows
    colour (photo, watercolor) and is judged by the colour heads (see `_shows_colour`).
    """
    logits = judge_logits(generated, judge)
    pred = {h: [HEADS[h][i] for i in logits[h].argmax(dim=-1).tolist()] for h in HEADS}
    asked = {"shape": list(shapes), **{a: [getattr(c, a) for c in contexts]
                                       for a in ("background", "position", "scale", "style", "accessory", "state")}}
    out = {a: torch.tensor([float(p == q) for p, q in zip(pred[a], asked[a])]) for a in asked}
    out["recolor"] = torch.tensor([_shows_colour(c, pattern, primary, secondary) for c, pattern, primary, secondary
                                   in zip(contexts, pred["pattern"], pred["primary"], pred["secondary"])])
    return {a: out[a] for a in TEXT_ATTRIBUTES}


def _shows_colour(context: Context, pattern: str, primary: str, secondary: str) -> float:
    """1.0 if the body shows the asked recolour (for stripes/checks either colour of the unordered pair), NaN if
    the prompt asks none or its style hides colour."""
    if context.recolor == "none" or context.style not in ("photo", "watercolor"):
        return math.nan
    return float(context.recolor in ((primary, secondary) if pattern in EQUAL_AREA_PATTERNS else (primary,)))


def image_quality(generated: torch.Tensor, targets: torch.Tensor, size: int = QUALITY_SIZE) -> torch.Tensor:
    """(B,) mean absolute difference in [0, 1] pixel units, after area-downsampling both to size×size.

    32×32 (4×4 pixel cells at 128) keeps layout, colours and coarse texture but forgives the renderer's
    seeded jitter (±3 % position, ±5 % scale), which a prompt cannot pin down. Lower is better; 0 = identical.
    """
    if generated.shape != targets.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and targets {tuple(targets.shape)} differ in shape")
    a = F.adaptive_avg_pool2d(generated.float(), size)
    b = F.adaptive_avg_pool2d(targets.float(), size)
    return ((a - b).abs() / 2.0).mean(dim=(1, 2, 3))


def identity_correct(images: torch.Tensor, subjects: Sequence[Subject], contexts: Sequence[Context],
                     judge: Judge | None = None) -> dict[str, torch.Tensor]:
    """{identity head: (B,) 1.0 / 0.0 = the judge sees the subject's attribute; NaN where the context hides it},
    plus "all": 1.0 when every visible identity attribute is right."""
    logits = judge_logits(images, judge)
    rows = [labels_for(s, c) for s, c in zip(subjects, contexts)]
    out = {}
    for h in IDENTITY_HEADS:
        y = torch.tensor([r[h] for r in rows])
        right = (logits[h].argmax(-1) == y).double()
        out[h] = torch.where(y == IGNORE, torch.full_like(right, math.nan), right)
    stacked = torch.stack(list(out.values()))  # (heads, B)
    out["all"] = torch.where(torch.isnan(stacked), torch.ones_like(stacked), stacked).prod(dim=0)
    return out


def copy_rate(images: torch.Tensor, contexts: Sequence[Context], demo_contexts: Sequence[Sequence[Context]],
              judge: Judge | None = None) -> torch.Tensor:
    """(B,) 1.0 where the image shows a demo's background or position instead of the prompt's (copy-paste of
    the demonstrations, the failure SuTI warns about), else 0.0."""
    logits = judge_logits(images, judge)
    copied = torch.zeros(len(images), dtype=torch.float64)
    for attribute in ("background", "position"):
        pred = [HEADS[attribute][i] for i in logits[attribute].argmax(dim=-1).tolist()]
        for i, (seen, context, demos) in enumerate(zip(pred, contexts, demo_contexts)):
            if seen != getattr(context, attribute) and seen in {getattr(d, attribute) for d in demos}:
                copied[i] = 1.0
    return copied


def head_accuracy(images: torch.Tensor, subjects: Sequence[Subject], contexts: Sequence[Context],
                  judge: Judge | None = None) -> dict[str, float]:
    """Per-head accuracy of the judge against the renderer's labels (IGNOREd labels left out)."""
    logits = judge_logits(images, judge)
    rows = [labels_for(s, c) for s, c in zip(subjects, contexts)]
    out = {}
    for h in HEADS:
        y = torch.tensor([r[h] for r in rows])
        seen = y != IGNORE
        out[h] = float((logits[h].argmax(-1)[seen] == y[seen]).float().mean()) if seen.any() else math.nan
    return out


def mean_stderr(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, ignoring NaNs; (nan, nan) when nothing is left."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[~torch.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else 0.0
