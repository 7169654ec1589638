"""Train the embedded default: autoencoder, then text encoder + UNet (diffusers host), export safetensors.

    python -m training.toy_base --run-dir ~/.cache/suti/runs/toy_base --resume
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from tqdm import tqdm

from suti_core.toy.autoencoder import ToyAutoencoder
from suti_core.toy.checkpoint import ToyBaseCheckpoint, read_toy_base
from suti_core.toy.spec import TOY_BASE_FORMAT, TOY_BASE_VERSION, ToyBaseSpec
from suti_core.toy.text_encoder import ToyTextEncoder, WordTokenizer

from .device import default_device
from .keymap import convert_diffusers_unet, unet_key_map
from .prefetch import prefetched
from .toy_data import WorldBatch, world_batch

STREAMS = {"ae": 0, "base": 1, "latent_scale": 2, "noise": 3}  # each draws its batches from (seed, stream, step)


def build_unet(spec: ToyBaseSpec) -> UNet2DConditionModel:
    """SD1.5-layout diffusers UNet at toy size (every level has cross-attention)."""
    levels = len(spec.unet_channels)
    return UNet2DConditionModel(
        sample_size=spec.image_size // 8, in_channels=spec.latent_channels, out_channels=spec.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=spec.unet_channels, layers_per_block=spec.layers_per_block,
        cross_attention_dim=spec.context_dim, attention_head_dim=spec.heads, norm_num_groups=32)


def ddpm_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """SD's scaled-linear schedule (ComfyUI's ModelSamplingDiscrete default), so samplers match."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def noised(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """DDPM's forward process x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps (alpha_bar broadcasts)."""
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


class ToyBaseTrainer:
    """Holds the modules, optimisers and step counters; checkpoints to run_dir/state.pt. Step k of a stage trains
    on the batch and noise drawn from (seed, stage, k) alone, so a resumed run continues exactly."""

    def __init__(self, spec: ToyBaseSpec, run_dir: Path, batch_size: int, seed: int, ae_batch_size: int = 16,
                 device: str = "cpu", lr: float = 4e-4, max_timestep: int = 1000):
        torch.manual_seed(seed)
        self.spec, self.run_dir, self.batch_size, self.ae_batch_size = spec, run_dir, batch_size, ae_batch_size
        self.seed, self.device = seed, torch.device(device)
        self.tokenizer = WordTokenizer(spec.vocabulary, spec.max_length)
        self.ae = ToyAutoencoder.from_spec(spec).to(self.device)
        self.text = ToyTextEncoder(len(self.tokenizer.words), spec.context_dim, spec.text_layers, 4,
                                   spec.max_length).to(self.device)
        self.unet = build_unet(spec).to(self.device)
        self.ema = {"text": copy.deepcopy(self.text).requires_grad_(False),
                    "unet": copy.deepcopy(self.unet).requires_grad_(False)}
        self.ae_opt = torch.optim.Adam(self.ae.parameters(), lr=2e-3)
        self.base_opt = torch.optim.AdamW(list(self.unet.parameters()) + list(self.text.parameters()), lr=lr,
                                          weight_decay=0.01)
        self.step = {"ae": 0, "base": 0}
        self.latent_scale = 1.0
        self.alphas_cumprod = ddpm_alphas_cumprod().to(self.device)
        if not 0 < max_timestep <= len(self.alphas_cumprod):
            raise ValueError(f"max_timestep {max_timestep} is outside 1..{len(self.alphas_cumprod)}")
        self.max_timestep = max_timestep
        self.noise = torch.Generator(self.device)

    def batches(self, stage: str, workers: int = 0) -> Iterator[WorldBatch]:
        """The stage's batches from its current step on, rendered ahead by `workers` processes."""
        size = self.ae_batch_size if stage == "ae" else self.batch_size
        make = partial(world_batch, self.seed, STREAMS[stage], size=self.spec.image_size, batch_size=size)
        return prefetched(make, self.step[stage], workers)

    def _batch(self, stage: str) -> WorldBatch:
        return next(self.batches(stage))

    # -- checkpointing ---------------------------------------------------------------------------
    def save(self) -> None:
        state = {"ae": self.ae.state_dict(), "text": self.text.state_dict(), "unet": self.unet.state_dict(),
                 "ema_text": self.ema["text"].state_dict(), "ema_unet": self.ema["unet"].state_dict(),
                 "ae_opt": self.ae_opt.state_dict(), "base_opt": self.base_opt.state_dict(),
                 "step": self.step, "latent_scale": self.latent_scale, "spec": self.spec.to_json(),
                 "seed": self.seed}
        tmp = self.run_dir / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.run_dir / "state.pt")

    @staticmethod
    def read_state(run_dir: Path) -> dict:
        return torch.load(run_dir / "state.pt", map_location="cpu", weights_only=False)

    def load(self, state: dict) -> None:
        for name in ("ae", "text", "unet"):
            getattr(self, name).load_state_dict(state[name])
        self.ema["text"].load_state_dict(state["ema_text"])
        self.ema["unet"].load_state_dict(state["ema_unet"])
        self.ae_opt.load_state_dict(state["ae_opt"])
        self.base_opt.load_state_dict(state["base_opt"])
        self.step, self.latent_scale = state["step"], state["latent_scale"]
        self.seed = state.get("seed", self.seed)  # the run's data stream, whatever --seed the resuming call passes

    def init_from_export(self, ckpt: ToyBaseCheckpoint) -> None:
        """Continue from a shipped toy base file (a new machine has no state.pt): weights, scale, step counts.

        Optimiser moments start afresh; the EMA starts at the exported (EMA) weights.
        """
        if ckpt.spec != self.spec:
            raise ValueError(f"the exported toy base was trained with {ckpt.spec}, not {self.spec}")
        to_diffusers = convert_diffusers_unet({k: k for k in self.unet.state_dict()}, self._unet_key_map())
        unet_state = {to_diffusers[k]: v.float() for k, v in ckpt.unet_state.items()}
        for module, state in ((self.unet, unet_state), (self.ema["unet"], unet_state),
                              (self.text, ckpt.text_state), (self.ema["text"], ckpt.text_state),
                              (self.ae, ckpt.vae_state)):
            module.load_state_dict({k: v.float() for k, v in state.items()})
        self.latent_scale = ckpt.latent_scale
        self.step = {"ae": int(ckpt.metadata["ae_steps"]), "base": int(ckpt.metadata["base_steps"])}

    def _unet_key_map(self) -> dict[str, str]:
        levels = len(self.spec.unet_channels)
        return unet_key_map(levels, self.spec.layers_per_block, (True,) * levels)

    def log(self, stage: str, **values: float) -> None:
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"stage": stage, "step": self.step[stage], "time": time.time(), **values}) + "\n")

    # -- stages ----------------------------------------------------------------------------------
    def ae_step(self, batch: WorldBatch | None = None) -> float:
        images = (batch or self._batch("ae")).images.to(self.device)
        recon = self.ae.decode(self.ae.encode(images))
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        self.ae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.ae_opt.step()
        self.step["ae"] += 1
        return loss.item()

    @torch.no_grad()
    def measure_latent_scale(self, batches: int = 16) -> float:
        """1 / std of clean latents, so the UNet sees unit-variance latents (SD's 0.18215 analogue)."""
        images = [world_batch(self.seed, STREAMS["latent_scale"], i, size=self.spec.image_size, batch_size=64).images
                  for i in range(batches)]
        latents = torch.cat([self.ae.encode(x.to(self.device)) for x in images])
        return float(1.0 / latents.std())

    def base_step(self, batch: WorldBatch | None = None) -> float:
        batch = batch or self._batch("base")
        self.noise.manual_seed(int(np.random.default_rng([self.seed, STREAMS["noise"], self.step["base"]]).integers(2**63)))
        n = len(batch.captions)
        dropped = torch.rand(n, device=self.device, generator=self.noise).tolist()
        captions = ["" if d < 0.1 else c for d, c in zip(dropped, batch.captions)]  # CFG dropout
        with torch.no_grad():
            latents = self.ae.encode(batch.images.to(self.device)) * self.latent_scale
        t = torch.randint(0, self.max_timestep, (n,), device=self.device, generator=self.noise)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = torch.randn(latents.shape, device=self.device, generator=self.noise)
        noisy = noised(latents, noise, a)
        context = self.text(self.tokenizer(captions).to(self.device))
        pred = self.unet(noisy, t, encoder_hidden_states=context).sample
        snr = a / (1 - a)
        weight = (snr.clamp(max=5.0) / snr).view(-1)  # min-SNR-5 weighting (Hang et al. 2023)
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        self.base_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text.parameters()), 1.0)
        self.base_opt.step()
        self.update_ema()
        self.step["base"] += 1
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(0.999, (1 + self.step["base"]) / (10 + self.step["base"]))
        for name in ("text", "unet"):
            for e, p in zip(self.ema[name].parameters(), getattr(self, name).parameters()):
                e.lerp_(p, 1 - decay)

    # -- export ----------------------------------------------------------------------------------
    def export(self, path: Path) -> None:
        """One safetensors file: unet.* (LDM names), text_encoder.*, vae.* (fp16) + spec metadata."""
        spec = self.spec
        tensors = {f"unet.{k}": v for k, v in convert_diffusers_unet(self.ema["unet"].state_dict(), self._unet_key_map()).items()}
        tensors |= {f"text_encoder.{k}": v for k, v in self.ema["text"].state_dict().items()}
        tensors |= {f"vae.{k}": v for k, v in self.ae.state_dict().items()}
        tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()}
        meta = {"format": TOY_BASE_FORMAT, "version": str(TOY_BASE_VERSION), "spec": spec.to_json(),
                "latent_scale": repr(self.latent_scale), "ae_steps": str(self.step["ae"]),
                "base_steps": str(self.step["base"])}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)


def run_stage(trainer: ToyBaseTrainer, stage: str, total_steps: int, minutes: float, checkpoint_minutes: float,
              on_checkpoint, workers: int = 0) -> None:
    """Run `stage` until total_steps or the time budget, checkpointing every few minutes."""
    step_fn = trainer.ae_step if stage == "ae" else trainer.base_step
    start = last_ckpt = time.time()
    bar = tqdm(total=total_steps, initial=trainer.step[stage], desc=stage, mininterval=10)
    losses: list[float] = []
    batches = trainer.batches(stage, workers)
    while trainer.step[stage] < total_steps and time.time() - start < minutes * 60:
        losses.append(step_fn(next(batches)))
        bar.update(1)
        if trainer.step[stage] % 50 == 0:
            trainer.log(stage, loss=sum(losses) / len(losses))
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            losses.clear()
        if time.time() - last_ckpt > checkpoint_minutes * 60:
            on_checkpoint()
            last_ckpt = time.time()
    bar.close()
    batches.close()
    on_checkpoint()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=Path.home() / ".cache/suti/runs/toy_base")
    parser.add_argument("--resume", action="store_true", help="continue from run-dir/state.pt if present")
    parser.add_argument("--init-from", type=Path, help="without a state.pt, start from this exported toy base "
                        "(e.g. the shipped models/toy/suti_toy_base.safetensors) instead of from scratch")
    parser.add_argument("--ae-steps", type=int, default=2000)
    parser.add_argument("--base-steps", type=int, default=20000)
    parser.add_argument("--minutes", type=float, default=600, help="wall-clock budget for this invocation")
    parser.add_argument("--batch-size", type=int, default=32, help="base-model batch size")
    parser.add_argument("--ae-batch-size", type=int, default=16)
    parser.add_argument("--checkpoint-minutes", type=float, default=4)
    parser.add_argument("--export", type=Path, default=Path(__file__).resolve().parents[1] / "models/toy/suti_toy_base.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--workers", type=int, default=0, help="processes rendering batches ahead (0: in the loop)")
    parser.add_argument("--lr", type=float, default=4e-4, help="UNet + text encoder learning rate")
    parser.add_argument("--max-timestep", type=int, default=1000,
                        help="train on timesteps below this only (e.g. 300: a fine-tune of the late, low-noise "
                             "steps, where min-SNR weighting gave the fine texture little weight)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    state = ToyBaseTrainer.read_state(args.run_dir) if args.resume and (args.run_dir / "state.pt").exists() else None
    init = read_toy_base(args.init_from) if args.init_from and state is None else None
    if state is not None:  # state.pt files from before the spec was saved in them are default-spec
        spec = ToyBaseSpec.from_json(state["spec"]) if "spec" in state else ToyBaseSpec()
    else:
        spec = init.spec if init is not None else ToyBaseSpec()  # e.g. a deepened decoder
    trainer = ToyBaseTrainer(spec, args.run_dir, args.batch_size, args.seed, args.ae_batch_size, args.device, args.lr,
                             args.max_timestep)
    if state is not None:
        trainer.load(state)
        print(f"resumed at {trainer.step}")
    elif init is not None:
        trainer.init_from_export(init)
        print(f"initialised from {args.init_from} at {trainer.step}")
    deadline = time.time() + args.minutes * 60

    def checkpoint() -> None:
        trainer.save()
        if trainer.step["base"]:
            trainer.export(args.run_dir / "latest.safetensors")

    if trainer.step["base"] == 0:  # the AE is frozen once the UNet trains on its latents: never resume it later
        run_stage(trainer, "ae", args.ae_steps, args.minutes, args.checkpoint_minutes, checkpoint, args.workers)
    if trainer.latent_scale == 1.0:
        trainer.latent_scale = trainer.measure_latent_scale()
        print(f"latent scale {trainer.latent_scale:.4f}")
    remaining = max(0.0, (deadline - time.time()) / 60)
    run_stage(trainer, "base", args.base_steps, remaining, args.checkpoint_minutes, checkpoint, args.workers)
    trainer.export(args.export)
    print(f"exported {args.export} at steps {trainer.step}")


if __name__ == "__main__":
    main()
