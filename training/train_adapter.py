"""Train the SuTI adapter on the toy world with the base model frozen (accelerate: one process on a CPU, DDP
across GPUs/nodes with `accelerate launch`).

An example is a train-split subject's demos (plain photo renders with their captions, as a user's demo
photos) and a render of the same subject in a new context with its caption; the loss is the frozen base's
noise-prediction MSE on that target with the adapter attending to the demos' features. The renderer is the
"expert" here: it draws the exact target that the paper's apprenticeship recipe gets from per-subject
DreamBooth experts.

    python -m training.train_adapter --steps 4000 --resume       # checkpoints every few minutes
    accelerate launch -m training.train_adapter --resume         # the same on several GPUs
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from suti_core.adapter import SuTIAdapter, load_adapter, save_adapter
from suti_core.adapter_format import check_adapter_matches_model
from suti_core.eval.metrics import to_tensor
from suti_core.toy.checkpoint import read_toy_base
from suti_core.world import Subject, caption_for, demo_contexts, render, sample_context, subject_from_id, subject_ids

from .adapter_host import DiffusersSuTIHost
from .loop import optimise
from .toy_base import ddpm_alphas_cumprod, noised
from .toy_controlnet import load_base_unet

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SubjectBatch:
    demo_images: torch.Tensor   # (B * n_demos, 3, S, S) in [-1, 1], grouped by subject
    demo_captions: list[str]
    target_images: torch.Tensor  # (B, 3, S, S)
    target_captions: list[str]
    subjects: list[Subject]


class SubjectDemoSampler:
    """Train-split subjects, each with `n_demos` demo renders and one target render in a sampled context."""

    def __init__(self, n_demos: int, size: int, p_edit: float, rng: np.random.Generator, split: str = "train"):
        self.ids, self.n_demos, self.size, self.p_edit, self.rng = subject_ids(split), n_demos, size, p_edit, rng

    def batch(self, batch_size: int) -> SubjectBatch:
        subjects = [subject_from_id(int(i)) for i in self.rng.choice(self.ids, batch_size)]
        demo_images, demo_captions, target_images, target_captions = [], [], [], []
        for subject in subjects:
            seed = int(self.rng.integers(2**31 - self.n_demos))
            for i, context in enumerate(demo_contexts(self.n_demos, seed)):
                demo_images.append(render(subject, context, self.size, seed + i))
                demo_captions.append(caption_for(subject, context, seed + i))
            context, target_seed = sample_context(self.rng, self.p_edit), int(self.rng.integers(2**31))
            target_images.append(render(subject, context, self.size, target_seed))
            target_captions.append(caption_for(subject, context, target_seed))
        return SubjectBatch(to_tensor(demo_images), demo_captions, to_tensor(target_images), target_captions, subjects)


class AdapterTrainer:
    """The frozen toy base (diffusers host), the adapter and its optimiser; one `loss()` per step."""

    def __init__(self, base: Path, accelerator: Accelerator, batch_size: int, n_demos: int, lr: float,
                 p_edit: float, caption_dropout: float):
        ckpt = read_toy_base(base)
        device = accelerator.device
        self.alphas = ddpm_alphas_cumprod().to(device)
        self.host = DiffusersSuTIHost(load_base_unet(ckpt).to(device), self.alphas)
        self.ae, self.text = ckpt.autoencoder().to(device), ckpt.text_encoder().to(device)
        self.tokenizer, self.latent_scale, self.size = ckpt.tokenizer(), ckpt.latent_scale, ckpt.spec.image_size
        self.adapter = self.host.new_adapter().to(device).train()
        self.opt = torch.optim.AdamW(self.adapter.parameters(), lr=lr, weight_decay=1e-4)
        self.accelerator, self.batch_size, self.n_demos = accelerator, batch_size, n_demos
        self.p_edit, self.caption_dropout = p_edit, caption_dropout
        self.opt = accelerator.prepare(self.opt)
        self.sampler = SubjectDemoSampler(n_demos, self.size, p_edit, np.random.default_rng(0))
        self.noise = torch.Generator(accelerator.device)
        self.losses: list[float] = []
        self.seed, self.step = 0, 0

    def start_data_at(self, step: int, seed: int) -> None:
        """Each step's examples, timesteps and noise are a function of (seed, step, process) alone, so a resumed
        run draws exactly what an unbroken run would have."""
        self.seed, self.step = seed, step
        self._seed_step()

    def _seed_step(self) -> None:
        self.sampler.rng = np.random.default_rng([self.seed, self.step, self.accelerator.process_index])
        self.noise.manual_seed(int(self.sampler.rng.integers(2**63)))

    @torch.no_grad()
    def _encode(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        return self.ae.encode(images.to(device)) * self.latent_scale, self.text(self.tokenizer(captions).to(device))

    def loss(self) -> torch.Tensor:
        self._seed_step()
        self.step += 1
        batch = self.sampler.batch(self.batch_size)
        demo_latents, demo_context = self._encode(batch.demo_images, batch.demo_captions)
        captions = ["" if self.sampler.rng.random() < self.caption_dropout else c for c in batch.target_captions]
        latents, context = self._encode(batch.target_images, captions)
        neighbors = self.host.encode_demos(demo_latents, demo_context, self.n_demos)
        t = torch.randint(0, len(self.alphas), (latents.shape[0],), device=latents.device, generator=self.noise)
        a = self.alphas[t].view(-1, 1, 1, 1)
        noise = torch.randn(latents.shape, device=latents.device, generator=self.noise)
        noisy = noised(latents, noise, a)
        with self.host.neighbor_attention(self.adapter, neighbors):
            pred = self.host.unet(noisy, t, context).sample
        loss = F.mse_loss(pred, noise)
        self.losses.append(loss.item())
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, then average the adapter's gradients over processes (the adapter is called block by block
        from the UNet's hooks, never as one DDP-wrapped forward, so the mean is taken here)."""
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in self.adapter.parameters():
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, run_dir: Path, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        state = {"adapter": self.adapter.state_dict(), "opt": self.opt.state_dict(), "step": step}
        torch.save(state, run_dir / "adapter_state.pt.tmp")
        (run_dir / "adapter_state.pt.tmp").replace(run_dir / "adapter_state.pt")
        if self.losses:
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": sum(self.losses) / len(self.losses), "time": time.time()}) + "\n")
            self.losses.clear()

    def load(self, run_dir: Path) -> int:
        state = torch.load(run_dir / "adapter_state.pt", map_location=self.accelerator.device, weights_only=False)
        self.adapter.load_state_dict(state["adapter"])
        self.opt.load_state_dict(state["opt"])
        return state["step"]

    def init_from(self, path: Path) -> None:
        """Start from a saved adapter (a new machine has no state to resume); the optimiser starts afresh."""
        adapter = load_adapter(path)
        check_adapter_matches_model(adapter.metadata, self.host.architecture, self.host.context_dim, self.host.block_specs)
        self.adapter.load_state_dict(adapter.state_dict())

    def export(self, path: Path, overwrite: bool) -> SuTIAdapter:
        adapter = self.host.new_adapter()
        adapter.load_state_dict({k: v.detach().cpu() for k, v in self.adapter.state_dict().items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(path, adapter, overwrite=overwrite)
        return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "models/toy/suti_toy_base.safetensors")
    parser.add_argument("--run-dir", type=Path, default=Path.home() / ".cache/suti/runs/adapter")
    parser.add_argument("--resume", action="store_true", help="continue from run-dir/adapter_state.pt if present")
    parser.add_argument("--init-from", type=Path, help="without a state to resume, start from this adapter file "
                        "(e.g. the shipped models/suti/suti_toy_adapter.safetensors) instead of zero")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--minutes", type=float, default=600, help="wall-clock budget for this invocation")
    parser.add_argument("--batch-size", type=int, default=8, help="subjects per step and process")
    parser.add_argument("--demos", type=int, default=3, help="demos per subject")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--p-edit", type=float, default=0.3, help="probability of each edit skill in target contexts")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty target captions (CFG)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--export", type=Path, help="also write the adapter here (default: only run-dir/latest)")
    parser.add_argument("--overwrite", action="store_true", help="let --export replace an existing file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export and args.export.exists() and not args.overwrite:
        raise SystemExit(f"{args.export} exists; pass --overwrite to replace it or choose another --export")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    trainer = AdapterTrainer(args.base, accelerator, args.batch_size, args.demos, args.lr, args.p_edit,
                             args.caption_dropout)
    step = trainer.load(args.run_dir) if args.resume and (args.run_dir / "adapter_state.pt").exists() else 0
    if step == 0 and args.init_from:
        trainer.init_from(args.init_from)
    trainer.start_data_at(step, args.seed)

    def save(reached: int) -> None:
        trainer.save(args.run_dir, reached)
        if accelerator.is_main_process:
            trainer.export(args.run_dir / "latest.safetensors", overwrite=True)

    step = optimise(trainer.loss, trainer.opt, step, args.steps, args.minutes, save, "adapter", backward=trainer.backward)
    if accelerator.is_main_process and args.export:
        trainer.export(args.export, overwrite=args.overwrite)
        print(f"exported {args.export} after {step} steps")


if __name__ == "__main__":
    main()
