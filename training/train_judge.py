"""Train the metric judge on renderer truth of train-split subjects; export models/eval/judge.safetensors.

    python -m training.train_judge --steps 7000 --pool 40000   # the shipped judge (v3), 1 thread
    python -m training.train_judge --role filter --seed 1 ...  # the render filter (training/render_filter.py)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from suti_core.eval.judge import HEADS, IGNORE, Judge, labels_for, load_judge, save_judge, to_judge_input
from suti_core.eval.metrics import head_accuracy

from .toy_data import WorldBatch, WorldSampler

DEFAULT_EXPORT = Path(__file__).resolve().parents[1] / "models/eval/judge.safetensors"


def batch_labels(batch: WorldBatch) -> dict[str, torch.Tensor]:
    """{head: (B,) long} with IGNORE where the render does not show the attribute."""
    rows = [labels_for(s, c) for s, c in zip(batch.subjects, batch.contexts)]
    return {h: torch.tensor([r[h] for r in rows]) for h in HEADS}


def judge_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy of the visible labels."""
    total = torch.zeros(())
    for h, y in labels.items():
        if (y != IGNORE).any():
            total = total + F.cross_entropy(logits[h], y, ignore_index=IGNORE)
    return total


def blur(images: torch.Tensor, sigmas: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Gaussian blur with one sigma (pixels) per image; sigma 0 leaves an image unchanged."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x**2 / (2 * sigmas.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)                     # (B, k), separable
    b, c, h, w = images.shape
    flat = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    k = kernel.repeat_interleave(c, dim=0)[:, None]                        # (B*C, 1, k)
    flat = F.conv2d(flat, k[..., None, :], groups=b * c)                   # along x
    flat = F.conv2d(flat, k[..., :, None], groups=b * c)                   # along y
    return flat.reshape(b, c, h, w)


def augment(images: torch.Tensor, p_blur: float, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """DINO-style photometric robustness without touching colour (palette is identity): a random Gaussian blur
    on a `p_blur` share of the batch, so the judge scores what a generated image shows rather than the
    renderer's pixel-exact edges."""
    if p_blur <= 0:
        return images
    chosen = torch.rand(images.shape[0], generator=generator) < p_blur
    sigmas = torch.rand(images.shape[0], generator=generator) * max_sigma * chosen
    return blur(images, sigmas)


def render_pool(n: int, seed: int, p_edit: float, size: int, chunk: int = 500) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`n` train-split renders, area-downsampled to the judge's input size and stored as uint8, with their labels."""
    sampler = WorldSampler("train", 128, seed, p_edit)
    images, labels = [], []
    for _ in tqdm(range(0, n, chunk), desc="render pool", mininterval=5):
        batch = sampler.batch(chunk)
        images.append(((to_judge_input(batch.images, size) + 1) * 127.5).round().to(torch.uint8))  # (chunk, 3, size, size)
        labels.append(batch_labels(batch))
    return torch.cat(images), {h: torch.cat([y[h] for y in labels]) for h in HEADS}


def train(steps: int, batch_size: int, lr: float, seed: int, p_edit: float, pool_size: int,
          log_path: Path | None, p_blur: float = 0.0, max_sigma: float = 1.5, init_from: Path | None = None) -> Judge:
    """AdamW + one-cycle LR on minibatches drawn from a pre-rendered pool (rendering dominates otherwise)."""
    torch.manual_seed(seed)
    judge = (load_judge(init_from).train().requires_grad_(True) if init_from else Judge()).to(memory_format=torch.channels_last)
    pool, pool_labels = render_pool(pool_size, seed, p_edit, judge.input_size)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="judge", mininterval=5)
    running = []
    for step in bar:
        idx = torch.randint(0, pool_size, (batch_size,), generator=generator)
        images = augment(pool[idx].float() / 127.5 - 1.0, p_blur, max_sigma, generator)  # (B, 3, S, S) in [-1, 1]
        loss = judge_loss(judge(images), {h: y[idx] for h, y in pool_labels.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            mean = sum(running) / len(running)
            running.clear()
            bar.set_postfix(loss=f"{mean:.4f}")
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": mean, "time": time.time()}) + "\n")
    return judge.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--p-edit", type=float, default=0.5, help="probability of each edit skill in training contexts")
    parser.add_argument("--pool", type=int, default=30000, help="pre-rendered training images (train-split subjects)")
    parser.add_argument("--blur", type=float, default=0.5, help="share of training images given a random Gaussian blur")
    parser.add_argument("--max-sigma", type=float, default=1.5, help="largest blur sigma in pixels (at 128 px)")
    parser.add_argument("--init-from", type=Path, help="continue training this judge file (new LR cycle, fresh pool)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval-samples", type=int, default=2000, help="test-split renders for the final accuracy table")
    parser.add_argument("--log", type=Path, default=Path.home() / ".cache/suti/runs/judge/log.jsonl")
    parser.add_argument("--export", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--role", choices=("judge", "filter"), default="judge",
                        help="filter: a separate network for training/render_filter.py, marked so in the file's "
                             "metadata (the judge only measures)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    judge = train(args.steps, args.batch_size, args.lr, args.seed, args.p_edit, args.pool, args.log, args.blur, args.max_sigma,
                  args.init_from)
    minutes = (time.time() - start) / 60
    test = WorldSampler("test", 128, seed=12345, p_edit=args.p_edit).batch(args.eval_samples)
    accuracy = head_accuracy(test.images, test.subjects, test.contexts, judge)
    for head, acc in accuracy.items():
        print(f"  {head:<11} {acc:.4f}")
    save_judge(judge, args.export, steps=str(args.steps), seed=str(args.seed), p_edit=str(args.p_edit),
               blur=str(args.blur), max_sigma=str(args.max_sigma), init_from=str(args.init_from or ""),
               test_accuracy=json.dumps({h: round(a, 4) for h, a in accuracy.items()}),
               **({"role": args.role} if args.role != "judge" else {}))  # the judge's file stays as it was
    print(f"trained {args.steps} steps in {minutes:.1f} min; exported {args.export}")


if __name__ == "__main__":
    main()
