"""Train the SuTI adapter with the base model frozen (accelerate: one process on a CPU, DDP across GPUs/nodes
with `accelerate launch`).

An example is a subject's demos (photos with their captions, as a user's demo photos) and an image of the same
subject in a new context with its caption; the loss is the frozen base's noise-prediction MSE on that target
with the adapter attending to the demos' features. On the toy world the renderer is the "expert": it draws the
exact target that the paper's apprenticeship recipe gets from per-subject DreamBooth experts.

The base (--base) is the toy base file or a diffusers SD1.x / SDXL checkpoint folder (training/expert_base.py);
the exported adapter records that base's block layout, so ComfyUI's SuTI nodes load it onto the same checkpoint.
The renderer draws only the toy world, so a diffusers base reads its examples from --shards (the data pipeline's
`pack` stage, `--size` = the base's image size), and the validation loss ratio (val-split renders) is logged for
the toy base only.

    python -m training.train_adapter --steps 4000 --resume       # checkpoints every few minutes
    accelerate launch -m training.train_adapter --resume         # the same on several GPUs
    python -m training.train_adapter --shards DIR --resume       # examples from shards (training.write_shards)
    python -m training.train_adapter --base SD15_FOLDER --shards DIR --resume   # a diffusers base: shards only
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from suti_core.adapter import SuTIAdapter, load_adapter, save_adapter, widened
from suti_core.adapter_format import check_adapter_matches_model
from suti_core.demo_features import FEATURE_SOURCES, DemoFeatures
from suti_core.world import (
    Subject,
    caption_for,
    render,
    render_demos,
    render_mask,
    sample_context,
    subject_from_id,
    subject_ids,
)

from .adapter_host import DiffusersSuTIHost
from .examples import SubjectBatch, SubjectExample, collate
from .expert_base import load_expert_base
from .expert_text import Conditioning
from .loop import optimise
from .prefetch import prefetched
from .shards import ShardSampler
from .toy_base import noised

ROOT = Path(__file__).resolve().parents[1]


class SubjectDemoSampler:
    """Train-split subjects, each with `n_demos` demo renders and one target render in a sampled context."""

    def __init__(self, n_demos: int, size: int, p_edit: float, rng: np.random.Generator, split: str = "train",
                 p_recolor: float | None = None):
        self.ids, self.n_demos, self.size, self.p_edit, self.rng = subject_ids(split), n_demos, size, p_edit, rng
        self.p_recolor = p_recolor

    def batch(self, batch_size: int) -> SubjectBatch:
        return collate(self.examples(batch_size))

    def examples(self, count: int) -> list[SubjectExample]:
        """`count` examples (what training.write_shards stores), drawn from `self.rng`."""
        subjects = [subject_from_id(int(i)) for i in self.rng.choice(self.ids, count)]
        return [self._example(subject) for subject in subjects]

    def _example(self, subject: Subject) -> SubjectExample:
        demos = render_demos(subject, self.n_demos, int(self.rng.integers(2**31 - self.n_demos)), self.size)
        context, target_seed = sample_context(self.rng, self.p_edit, self.p_recolor), int(self.rng.integers(2**31))
        return SubjectExample(subject.id, demos.images, list(demos.masks), demos.captions,
                              render(subject, context, self.size, target_seed),
                              render_mask(subject, context, self.size, target_seed),
                              caption_for(subject, context, target_seed))


@dataclass(frozen=True)
class AdapterRecipe:
    """How the adapter learns: data mix, noise levels, optimiser schedule and averaging."""

    batch_size: int = 8          # subjects per step and process
    n_demos: int = 3
    lr: float = 3e-4
    warmup: int = 200            # linear warm-up steps, then cosine decay to lr * final_lr_fraction at `steps`
    steps: int = 4000
    final_lr_fraction: float = 0.1
    p_edit: float = 0.15         # the benchmark's edit mix
    p_recolor: float | None = None  # share of recoloured targets (None: p_edit), where the text must beat the demos
    caption_dropout: float = 0.1
    mask_rate: float = 0.5       # share of examples whose demos carry their exact subject masks
    timesteps: str = "high-noise"  # TIMESTEP_DENSITIES: where in the schedule the examples' noise levels fall
    ema: float = 0.999           # exported weights are this exponential moving average (0: the raw weights)
    feature_source: str = "encoder"
    subject_weight: float = 1.0  # loss weight of the target's subject pixels over its background (identity lives there)
    finest_heads: int = 0        # neighbor-attention heads at the finest level's blocks (0: each block's own)
    reads_prompt: bool = False   # the prompt's tokens join the demos' as keys and values (joint attention)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.final_lr_fraction + (1 - self.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


VALIDATION_T = (300, 500, 700, 900)
TIMESTEP_DENSITIES = {
    "uniform": "every t alike",
    "high-noise": "density rising linearly in t: layout and colours, decided early, drawn most",
    "low-noise": "density falling linearly in t: the fine texture (pattern), committed in the last steps, drawn most",
}


def example_rngs(seed: int, step: int, process: int, batch_size: int) -> list[np.random.Generator]:
    """Generators of `process`'s examples at `step`. Example i of a step's whole batch (batch_size × processes)
    draws from the generator seeded (seed, step, i) alone, and process p takes examples [p*B, (p+1)*B): so a
    step's examples, timesteps and noise do not depend on how many processes share it (as training.write_shards'
    sample i is drawn from (seed, i))."""
    return [np.random.default_rng([seed, step, i]) for i in range(process * batch_size, (process + 1) * batch_size)]


DrawnExample = tuple[SubjectExample, bool, bool, int]  # example, demo masks on, caption dropped, noise seed


def step_examples(sampler: SubjectDemoSampler | ShardSampler, recipe: AdapterRecipe, seed: int, process: int,
                  step: int) -> list[DrawnExample]:
    """`process`'s examples of `step`, each from its own generator (`example_rngs`) with its choices."""
    drawn = []
    for rng in example_rngs(seed, step, process, recipe.batch_size):
        sampler.rng = rng
        example = sampler.examples(1)[0]
        masked, dropped = rng.random() < recipe.mask_rate, rng.random() < recipe.caption_dropout
        drawn.append((example, masked, dropped, int(rng.integers(2**63))))
    return drawn


def renderer_needs_toy_base(base: Path, architecture: str, image_size: int) -> str:
    """Why a diffusers base cannot train on rendered examples, and the fix."""
    return (f"{base} is a diffusers {architecture} base, but the renderer draws only the toy world's images; pass "
            f"--shards DIR with examples at {image_size}px (the data pipeline's `python -m training.data pack "
            f"--size {image_size}` output), or --base the toy base file to train on renders")


class AdapterTrainer:
    """The frozen base (toy file or diffusers SD1.x / SDXL folder, as training.expert_base loads it) on the
    diffusers host, the adapter, its EMA and optimiser; one `loss()` per step. Examples are rendered (toy base
    only), or read from the WebDataset shards in `shards` when given."""

    def __init__(self, base: Path, accelerator: Accelerator, recipe: AdapterRecipe, shards: Path | None = None):
        if recipe.timesteps not in TIMESTEP_DENSITIES:
            raise ValueError(f"timesteps {recipe.timesteps!r} is not one of {', '.join(TIMESTEP_DENSITIES)}")
        self.base = load_expert_base(base, None, accelerator.device)
        self.toy, self.size = self.base.architecture == "toy", self.base.image_size
        if shards is None and not self.toy:
            raise ValueError(renderer_needs_toy_base(base, self.base.architecture, self.size))
        self.alphas = self.base.alphas_cumprod
        self.host = DiffusersSuTIHost(self.base.unet, self.alphas, self.base.architecture, recipe.feature_source,
                                      recipe.finest_heads, recipe.reads_prompt)
        device = accelerator.device
        self.adapter = self.host.new_adapter().to(device).train()
        self.ema = self.host.new_adapter().to(device).requires_grad_(False)
        self.ema.load_state_dict(self.adapter.state_dict())
        self.opt = accelerator.prepare(torch.optim.AdamW(self.adapter.parameters(), lr=recipe.lr, weight_decay=1e-4))
        self.accelerator, self.recipe = accelerator, recipe
        rng = np.random.default_rng(0)  # replaced by each example's own generator (example_rngs)
        self.sampler = (ShardSampler(shards, recipe.n_demos, self.size, rng) if shards is not None
                        else SubjectDemoSampler(recipe.n_demos, self.size, recipe.p_edit, rng,
                                                p_recolor=recipe.p_recolor))
        self.noise = torch.Generator(accelerator.device)
        self.losses: list[float] = []
        self.seed, self.step, self.workers = 0, 0, 0
        self._drawn: Iterator[list[DrawnExample]] | None = None
        self._validation: dict | None = None
        if not self.toy:
            accelerator.print(f"no validation loss: val-split renders exist for the toy base only, not {base}")

    def start_data_at(self, step: int, seed: int, workers: int = 0) -> None:
        """Draw from `step` on (see `example_rngs`), so a resumed run draws exactly what an unbroken run would
        have, on any number of processes; `workers` processes render the examples ahead."""
        self.seed, self.step, self.workers = seed, step, workers
        if self._drawn is not None:
            self._drawn.close()
        self._drawn = None

    def _step_examples(self) -> list[DrawnExample]:
        if self._drawn is None:
            make = partial(step_examples, self.sampler, self.recipe, self.seed, self.accelerator.process_index)
            self._drawn = prefetched(make, self.step, self.workers)
        return next(self._drawn)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, Conditioning]:
        """The base's scaled latents of `images` and its conditioning on `captions` (SDXL's added one included)."""
        return self.base.encode_images(images), self.base.text(captions)

    def _neighbors(self, batch: SubjectBatch, masked: list[bool]) -> DemoFeatures:
        """Demo features of a batch; subject `i`'s demos carry their masks where masked[i]."""
        n = self.recipe.n_demos
        masks = [m if masked[i // n] else None for i, m in enumerate(batch.demo_masks)]
        demo_latents, demo_text = self._encode(batch.demo_images, batch.demo_captions)
        return self.host.encode_demos(demo_latents, demo_text.context, n, masks, demo_text.added)

    def _timesteps(self, count: int) -> torch.Tensor:
        u = torch.rand(count, device=self.alphas.device, generator=self.noise)
        if self.recipe.timesteps == "high-noise":
            u = u.sqrt()  # density 2u: t near 1000 drawn most, small t rarely
        elif self.recipe.timesteps == "low-noise":
            u = 1 - u.sqrt()  # density 2(1 - u): small t drawn most, t near 1000 rarely
        return (u * len(self.alphas)).long().clamp(max=len(self.alphas) - 1)

    def _noised(self, latents: torch.Tensor, seeds: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """Each example's timestep and noise, drawn from its own seed; returns (noisy latents, t, noise)."""
        t, noise = [], []
        for latent, seed in zip(latents, seeds, strict=True):
            self.noise.manual_seed(seed)
            t.append(self._timesteps(1))
            noise.append(torch.randn(latent.shape, device=latent.device, generator=self.noise))
        t, noise = torch.cat(t), torch.stack(noise)  # (B,), (B, C, h, w)
        return noised(latents, noise, self.alphas[t].view(-1, 1, 1, 1)), t, noise

    def loss(self) -> torch.Tensor:
        examples, masked, dropped, seeds = zip(*self._step_examples())
        self.step += 1
        batch = collate(examples)
        neighbors = self._neighbors(batch, list(masked))
        captions = ["" if drop else c for drop, c in zip(dropped, batch.target_captions)]
        latents, text = self._encode(batch.target_images, captions)
        noisy, t, noise = self._noised(latents, seeds)
        with self.host.neighbor_attention(self.adapter, neighbors):
            pred = self.base.predict_noise(noisy, t, text)
        loss = self._weighted_mse(pred, noise, batch.target_masks)
        self.losses.append(loss.item())
        return loss

    def _weighted_mse(self, pred: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Noise MSE with the subject's latent cells weighted `subject_weight` (a cell counts as subject when the
        render's mask covers any of it); the weights are normalised to mean 1 per example, so the loss scale and
        the learning rate mean the same at every weight."""
        if self.recipe.subject_weight == 1.0:
            return F.mse_loss(pred, noise)
        cells = F.adaptive_max_pool2d(masks[:, None].float(), pred.shape[-2:]).to(pred)  # (B, 1, h, w)
        weight = 1 + (self.recipe.subject_weight - 1) * cells
        weight = weight / weight.mean(dim=(2, 3), keepdim=True)
        return (weight * (pred - noise) ** 2).mean()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, then average the adapter's gradients over processes (the adapter is called block by block
        from the UNet's hooks, never as one DDP-wrapped forward, so the mean is taken here). The mean over
        processes of per-process mean losses is the mean loss of the step's whole batch only because every
        process draws the same `batch_size`: so N processes × B step as 1 process × N*B would."""
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in self.adapter.parameters():
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` is true on any process: each process's clock runs apart, and one that stopped alone
        would leave the others waiting in their gradient all-reduce."""
        flag = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def after_step(self, step: int) -> None:
        """EMA update, then the learning rate of the next step."""
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.adapter.parameters()):
                e.lerp_(p, 1 - self.recipe.ema)
        self.set_lr(step)

    def set_lr(self, step: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.recipe.lr_at(step)

    # -- validation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def validation(self, subjects: int = 48) -> dict[str, float]:
        """Denoising loss of the EMA adapter over none on fixed val-split examples (3 demos, no masks) at fixed
        noise, per timestep in VALIDATION_T: the number that says whether training still helps. Toy base only
        (the renderer draws the val split): empty for a diffusers base."""
        if not self.toy:
            return {}
        if self._validation is None:
            sampler = SubjectDemoSampler(self.recipe.n_demos, self.size, self.recipe.p_edit,
                                         np.random.default_rng(1234), split="val")
            batch = sampler.batch(subjects)
            latents, text = self._encode(batch.target_images, batch.target_captions)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1234)).to(latents)
            self._validation = {"features": self._neighbors(batch, [False] * subjects), "latents": latents,
                                "text": text, "noise": noise}
            self._validation["none"] = self._validation_losses(self.host.new_adapter().to(latents.device))
        ours = self._validation_losses(self.ema)
        return {f"val_ratio_t{t}": ours[t] / self._validation["none"][t] for t in VALIDATION_T}

    def _validation_losses(self, adapter: SuTIAdapter) -> dict[int, float]:
        v = self._validation
        losses = {}
        for t in VALIDATION_T:
            steps = torch.full((len(v["latents"]),), t, device=v["latents"].device)
            with self.host.neighbor_attention(adapter, v["features"]):
                pred = self.base.predict_noise(noised(v["latents"], v["noise"], self.alphas[t]), steps, v["text"])
            losses[t] = float(F.mse_loss(pred, v["noise"]))
        return losses

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, run_dir: Path, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        state = {"adapter": self.adapter.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                 "step": step, "finest_heads": self.recipe.finest_heads, "reads_prompt": self.recipe.reads_prompt}
        torch.save(state, run_dir / "adapter_state.pt.tmp")
        (run_dir / "adapter_state.pt.tmp").replace(run_dir / "adapter_state.pt")
        record = {"step": step, "time": time.time(), **self.validation()}
        if self.losses:
            record["loss"] = sum(self.losses) / len(self.losses)
            self.losses.clear()
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def load(self, run_dir: Path) -> int:
        state = torch.load(run_dir / "adapter_state.pt", map_location=self.accelerator.device, weights_only=False)
        if state.get("finest_heads", 0) != self.recipe.finest_heads:
            raise ValueError(f"{run_dir} holds a run with --finest-heads {state.get('finest_heads', 0)}, not "
                             f"{self.recipe.finest_heads}; resume with the value it started with, or use another --run-dir")
        if state.get("reads_prompt", False) != self.recipe.reads_prompt:
            flag = "with" if state.get("reads_prompt", False) else "without"
            raise ValueError(f"{run_dir} holds a run {flag} --read-prompt; resume {flag} it, or use another --run-dir")
        self.adapter.load_state_dict(state["adapter"])
        self.ema.load_state_dict(state.get("ema", state["adapter"]))
        self.opt.load_state_dict(state["opt"])
        return state["step"]

    def init_from(self, path: Path) -> None:
        """Start from a saved adapter (a new machine has no state to resume); the optimiser starts afresh.
        An adapter of the other feature source loads too (same dims): only its block map differs; one with fewer
        heads than the recipe's (`finest_heads`) is widened to them, computing the same function, and one that
        does not read the prompt gets zero prompt projections when the recipe reads it."""
        adapter = load_adapter(path)
        check_adapter_matches_model(adapter.metadata, self.host.architecture, self.host.context_dim,
                                    self.host.block_specs, compare_sources=False)
        if adapter.metadata.reads_prompt and not self.recipe.reads_prompt:
            raise ValueError(f"{path} reads the prompt; pass --read-prompt to continue it")
        adapter = widened(adapter, self.host.block_specs, self.recipe.reads_prompt)
        self.adapter.load_state_dict(adapter.state_dict())
        self.ema.load_state_dict(adapter.state_dict())

    def export(self, path: Path, overwrite: bool) -> SuTIAdapter:
        """Write the EMA weights (the raw ones with ema 0) as an adapter file."""
        weights = self.ema if self.recipe.ema > 0 else self.adapter
        adapter = self.host.new_adapter()
        adapter.load_state_dict({k: v.detach().cpu() for k, v in weights.state_dict().items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(path, adapter, overwrite=overwrite)
        return adapter


def add_edit_mix_arguments(parser: argparse.ArgumentParser, defaults: AdapterRecipe) -> None:
    """--p-edit and --p-recolor: the targets' edit mix, as the trainer and training.write_shards draw it."""
    parser.add_argument("--p-edit", type=float, default=defaults.p_edit, help="probability of each edit skill in targets")
    parser.add_argument("--p-recolor", type=float, default=defaults.p_recolor,
                        help="probability of a recolour edit in targets (default: --p-edit): more examples where "
                        "the caption's colour, not the demos', is the answer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "models/toy/suti_toy_base.safetensors",
                        help="the toy base file, or a diffusers SD1.x / SDXL checkpoint folder (needs --shards; no "
                        "validation loss)")
    parser.add_argument("--run-dir", type=Path, default=Path.home() / ".cache/suti/runs/adapter")
    parser.add_argument("--resume", action="store_true", help="continue from run-dir/adapter_state.pt if present")
    parser.add_argument("--init-from", type=Path, help="without a state to resume, start from this adapter file "
                        "(e.g. the shipped models/suti/suti_toy_adapter.safetensors) instead of zero")
    defaults = AdapterRecipe()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="also the end of the cosine schedule")
    parser.add_argument("--minutes", type=float, default=600, help="wall-clock budget for this invocation")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="subjects per step and process")
    parser.add_argument("--demos", type=int, default=defaults.n_demos, help="demos per subject")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps")
    add_edit_mix_arguments(parser, defaults)
    parser.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout,
                        help="share of empty target captions (CFG)")
    parser.add_argument("--mask-rate", type=float, default=defaults.mask_rate,
                        help="share of examples whose demos carry subject masks (SuTI Demonstrations' optional MASK)")
    parser.add_argument("--timesteps", choices=tuple(TIMESTEP_DENSITIES), default=defaults.timesteps,
                        help="; ".join(f"{name}: {why}" for name, why in TIMESTEP_DENSITIES.items()))
    parser.add_argument("--subject-weight", type=float, default=defaults.subject_weight,
                        help="loss weight of the target's subject over its background (1: plain MSE)")
    parser.add_argument("--finest-heads", type=int, default=defaults.finest_heads,
                        help="heads of the neighbor attention at the finest level's blocks, where a pattern's phase "
                        "lives (0: each block's own); --init-from a narrower adapter widens it without changing "
                        "what it computes")
    parser.add_argument("--read-prompt", action="store_true",
                        help="the prompt's tokens join the demos' as the neighbor attention's keys and values, so a "
                        "block can let the prompt's colour beat the demos' ('a purple dog'); the file is then format "
                        "version 2. --init-from a file without them adds them at zero")
    parser.add_argument("--ema", type=float, default=defaults.ema, help="EMA decay of the exported weights (0: off)")
    parser.add_argument("--demo-features", choices=FEATURE_SOURCES, default=defaults.feature_source,
                        help="blocks whose demo features the neighbor attention reads (SuTI: encoder)")
    parser.add_argument("--shards", type=Path, help="read the examples from this folder's WebDataset shards "
                        "(python -m training.write_shards, or the data pipeline's pack stage at the base's image "
                        "size) instead of rendering them; resume is exact while the shards stay unchanged (--p-edit "
                        "then only sets the validation examples, --p-recolor nothing: the shards keep the mix "
                        "training.write_shards gave them); required with a diffusers base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=0, help="processes rendering examples ahead (0: in the loop)")
    parser.add_argument("--export", type=Path, help="also write the adapter here (default: only run-dir/latest)")
    parser.add_argument("--overwrite", action="store_true", help="let --export replace an existing file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export and args.export.exists() and not args.overwrite:
        raise SystemExit(f"{args.export} exists; pass --overwrite to replace it or choose another --export")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    recipe = AdapterRecipe(args.batch_size, args.demos, args.lr, args.warmup, args.steps, p_edit=args.p_edit,
                           p_recolor=args.p_recolor, caption_dropout=args.caption_dropout, mask_rate=args.mask_rate,
                           timesteps=args.timesteps,
                           ema=args.ema, feature_source=args.demo_features,
                           subject_weight=args.subject_weight, finest_heads=args.finest_heads,
                           reads_prompt=args.read_prompt)
    trainer = AdapterTrainer(args.base, accelerator, recipe, shards=args.shards)
    step = trainer.load(args.run_dir) if args.resume and (args.run_dir / "adapter_state.pt").exists() else 0
    if step == 0 and args.init_from:
        trainer.init_from(args.init_from)
    trainer.start_data_at(step, args.seed, args.workers)
    trainer.set_lr(step)

    def save(reached: int) -> None:
        trainer.save(args.run_dir, reached)
        if accelerator.is_main_process:
            trainer.export(args.run_dir / "latest.safetensors", overwrite=True)

    step = optimise(trainer.loss, trainer.opt, step, args.steps, args.minutes, save, "adapter",
                    backward=trainer.backward, after_step=trainer.after_step,
                    agree=trainer.any_process if accelerator.num_processes > 1 else None)
    if accelerator.is_main_process and args.export:
        trainer.export(args.export, overwrite=args.overwrite)
        print(f"exported {args.export} after {step} steps")


if __name__ == "__main__":
    main()
