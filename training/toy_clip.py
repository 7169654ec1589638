"""Train the toy CLIP: a small open_clip CLIP on train-split world renders and their captions, written in open_clip's
local layout so `python -m training.data clip-filter --model DIR` loads it unchanged.

    python -m training.toy_clip --out ~/.cache/suti/toy_clip --minutes 25 --resume

Captions name a render's shape and context, never its identity (pattern, palette, detail), so the image–text term
alone would not separate subjects: each batch holds two renders of every subject, in different contexts, and a
SimCLR/SupCon term makes them each other's positive, which is what clip-filter's `image_image` score needs.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from suti_core.world import caption_for, render, sample_context, subject_from_id, subject_ids

from .data.clip_filter import OPEN_CLIP_CONFIG
from .prefetch import prefetched

WEIGHTS = "open_clip_model.safetensors"
RENDER_SIZE = 128  # the synthetic crawl's image size: the model sees what clip-filter's transform makes of it
CHECKPOINT_MINUTES = 2.0
# 2.75 MB in fp16, 49408 x 24 of it the token embedding that open_clip's BPE tokenizer (its default) needs
TOY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2},
}


@dataclass
class PairBatch:
    pixels: torch.Tensor  # (B, 3, S, S): rows 2k and 2k+1 show one subject in two contexts
    tokens: torch.Tensor  # (B, L): each render's own caption


def pair_batch(seed: int, step: int, *, batch_size: int, transform: Callable, tokenizer: Callable,
               p_edit: float = 0.15) -> PairBatch:
    """Step `step`'s batch, drawn from (seed, step) alone: the same whichever process makes it (training.prefetch)."""
    rng = np.random.default_rng([seed, step])
    images, captions = [], []
    for subject_id in rng.choice(subject_ids("train"), batch_size // 2, replace=False):
        subject = subject_from_id(int(subject_id))
        for _ in range(2):
            context, render_seed = sample_context(rng, p_edit), int(rng.integers(1 << 31))
            images.append(transform(Image.fromarray(render(subject, context, RENDER_SIZE, render_seed))))
            captions.append(caption_for(subject, context, variant=int(rng.integers(1 << 16))))
    return PairBatch(torch.stack(images), tokenizer(captions))


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """CLIP's symmetric InfoNCE over image–caption pairs (Radford et al. 2021) and InfoNCE over the two renders of
    each subject (SimCLR's NT-Xent, Chen et al. 2020); inputs are unit-norm (B, D) rows."""
    n = len(image)
    target = torch.arange(n)
    logits = scale * image @ text.T  # (B, B)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    same = (scale * image @ image.T).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))  # (B, B)
    pair = F.cross_entropy(same, target ^ 1)  # row 2k's positive is 2k+1 and back
    return {"clip": clip, "pair": pair, "loss": clip + pair}


class ToyClipTrainer:
    """Model, optimiser and step count; `out` holds the open_clip folder, state.pt (to resume) and log.jsonl.
    The model, transform and tokenizer are built from the folder's own config, as clip-filter builds them."""

    def __init__(self, out: Path, cfg: dict[str, Any], batch_size: int, seed: int, lr: float = 1e-3,
                 warmup: int = 100):
        if batch_size < 4 or batch_size % 2:
            raise ValueError(f"--batch-size must be even and at least 4 (two renders per subject), got {batch_size}")
        out.mkdir(parents=True, exist_ok=True)
        (out / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}, indent=1) + "\n")
        torch.manual_seed(seed)
        name = f"local-dir:{out}"
        self.model, _, self.transform = open_clip.create_model_and_transforms(name, load_weights=False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.out, self.cfg, self.batch_size, self.seed, self.lr, self.warmup = out, cfg, batch_size, seed, lr, warmup
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        self.step = 0

    def batches(self, workers: int = 0) -> Iterator[PairBatch]:
        """The batches from the current step on, rendered ahead by `workers` processes."""
        make = partial(pair_batch, self.seed, batch_size=self.batch_size, transform=self.transform,
                       tokenizer=self.tokenizer)
        return prefetched(make, self.step, workers)

    def train_step(self, batch: PairBatch) -> dict[str, float]:
        """One AdamW step (linear warmup, then constant lr) on the contrastive loss."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, (self.step + 1) / self.warmup)
        self.model.train()
        image = F.normalize(self.model.encode_image(batch.pixels), dim=-1)  # (B, D)
        text = F.normalize(self.model.encode_text(batch.tokens), dim=-1)  # (B, D)
        losses = contrastive_loss(image, text, self.model.logit_scale.exp().clamp(max=100))
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.opt.step()
        self.step += 1
        return {k: v.item() for k, v in losses.items()}

    def save(self) -> None:
        """state.pt (atomically) and the open_clip weights in fp16."""
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                 "seed": self.seed, "batch_size": self.batch_size, "cfg": self.cfg}
        torch.save(state, self.out / "state.pt.tmp")
        (self.out / "state.pt.tmp").replace(self.out / "state.pt")
        weights = {k: v.detach().to(torch.float16).contiguous() for k, v in self.model.state_dict().items()}
        save_file(weights, str(self.out / f"{WEIGHTS}.tmp"), metadata={"steps": str(self.step)})
        (self.out / f"{WEIGHTS}.tmp").replace(self.out / WEIGHTS)

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]

    @classmethod
    def resumed(cls, out: Path, lr: float) -> ToyClipTrainer:
        """The run in `out`, with its own config, seed and batch size whatever the resuming call passes."""
        state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
        trainer = cls(out, state["cfg"], state["batch_size"], state["seed"], lr)
        trainer.load(state)
        return trainer

    def log(self, **values: float) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "time": time.time(), **values}) + "\n")


def train(trainer: ToyClipTrainer, steps: int, minutes: float, workers: int = 0, log_every: int = 20) -> None:
    """Train until `steps` or the time budget, saving every few minutes and at the end."""
    start = last_save = time.time()
    batches, window = trainer.batches(workers), []
    while trainer.step < steps and time.time() - start < minutes * 60:
        window.append(trainer.train_step(next(batches)))
        if trainer.step % log_every == 0:
            means = {k: round(sum(w[k] for w in window) / len(window), 4) for k in window[0]}
            trainer.log(**means, logit_scale=round(trainer.model.logit_scale.exp().item(), 2))
            print(f"step {trainer.step}: {means}", flush=True)
            window.clear()
        if time.time() - last_save > CHECKPOINT_MINUTES * 60:
            trainer.save()
            last_save = time.time()
    batches.close()
    trainer.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the open_clip folder (+ state.pt, log.jsonl)")
    parser.add_argument("--steps", type=int, default=20000, help="total steps of the run")
    parser.add_argument("--minutes", type=float, default=60, help="wall-clock budget for this invocation")
    parser.add_argument("--batch-size", type=int, default=64, help="renders per step, two per subject")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=0, help="processes rendering batches ahead (0: in the loop)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/state.pt if present")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume and (args.out / "state.pt").exists():
        trainer = ToyClipTrainer.resumed(args.out, args.lr)
        print(f"resumed at step {trainer.step}")
    else:
        trainer = ToyClipTrainer(args.out, TOY_CLIP_CFG, args.batch_size, args.seed, args.lr)
    train(trainer, args.steps, args.minutes, args.workers)
    print(f"saved {args.out / WEIGHTS} at step {trainer.step}")


if __name__ == "__main__":
    main()
