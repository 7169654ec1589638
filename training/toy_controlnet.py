"""Train a pose ControlNet for the toy base (condition = the subject's silhouette map), export it in
ComfyUI's LDM ControlNet layout so the stock ControlNetLoader loads it.

    python -m training.toy_controlnet --base models/toy/suti_toy_base.safetensors --resume

The stock loader builds an unknown UNet layout from ComfyUI's base model config, whose attention heads
are 64 channels wide; the ControlNet is therefore built with 64-channel heads (the base UNet keeps its
own), so the network ComfyUI builds is the one that was trained.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

from suti_core.toy.checkpoint import ToyBaseCheckpoint, read_toy_base
from suti_core.world import caption_for, pose_map

from .device import default_device
from .keymap import convert_diffusers_unet, unet_key_map
from .loop import optimise
from .prefetch import prefetched
from .toy_base import build_unet, ddpm_alphas_cumprod, noised
from .toy_data import world_batch

COMFY_HEAD_CHANNELS = 64  # comfy.supported_models_base.BASE.unet_extra_config
_HINT_BLOCK = {"controlnet_cond_embedding.conv_in": "input_hint_block.0",
               **{f"controlnet_cond_embedding.blocks.{i}": f"input_hint_block.{2 * i + 2}" for i in range(6)},
               "controlnet_cond_embedding.conv_out": "input_hint_block.14",
               "controlnet_mid_block": "middle_block_out.0"}


def load_base_unet(ckpt: ToyBaseCheckpoint) -> UNet2DConditionModel:
    """The frozen diffusers UNet of a toy base file (inverse of the export's key map)."""
    unet = build_unet(ckpt.spec)
    levels = len(ckpt.spec.unet_channels)
    to_ldm = convert_diffusers_unet({k: k for k in unet.state_dict()}, unet_key_map(levels, ckpt.spec.layers_per_block, (True,) * levels))
    unet.load_state_dict({to_ldm[k]: v.float() for k, v in ckpt.unet_state.items()})
    return unet.eval().requires_grad_(False)


def build_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """A ControlNet initialised from the base UNet's encoder, with 64-channel attention heads."""
    config = dict(unet.config)
    if any(c % COMFY_HEAD_CHANNELS for c in config["block_out_channels"]):
        raise ValueError(f"UNet widths {config['block_out_channels']} are not multiples of {COMFY_HEAD_CHANNELS}: "
                         "ComfyUI's stock ControlNet loader could not rebuild the attention heads")
    heads = tuple(c // COMFY_HEAD_CHANNELS for c in config["block_out_channels"])
    controlnet = ControlNetModel(
        in_channels=config["in_channels"], down_block_types=config["down_block_types"],
        block_out_channels=config["block_out_channels"], layers_per_block=config["layers_per_block"],
        cross_attention_dim=config["cross_attention_dim"], attention_head_dim=heads, norm_num_groups=config["norm_num_groups"],
        conditioning_channels=3)
    encoder = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")}
    missing = set(encoder) - set(controlnet.state_dict())
    assert not missing, f"ControlNet lacks UNet encoder weights {sorted(missing)[:3]}"
    controlnet.load_state_dict(encoder, strict=False)
    return controlnet


def controlnet_to_ldm(controlnet: ControlNetModel, levels: int, layers_per_block: int) -> dict[str, torch.Tensor]:
    """diffusers ControlNet state dict -> ComfyUI cldm names (input_blocks, zero_convs, input_hint_block, ...)."""
    modules = unet_key_map(levels, layers_per_block, (True,) * levels) | _HINT_BLOCK
    modules |= {f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(len(controlnet.controlnet_down_blocks))}
    return convert_diffusers_unet(controlnet.state_dict(), modules)


def pose_maps(batch, size: int) -> torch.Tensor:
    """(B, 3, S, S) silhouette maps in [0, 1] (ComfyUI passes hint images in [0, 1])."""
    maps = [pose_map(s, c, size, seed) for s, c, seed in zip(batch.subjects, batch.contexts, batch.seeds)]
    return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2)


def hint_captions(batch, p_pose_free: float, rng: np.random.Generator) -> list[str]:
    """The batch's captions, each with probability `p_pose_free` rewritten without position and scale words, so
    the ControlNet learns to place the subject from the hint alone (what its users' prompts look like)."""
    return [caption_for(s, c, seed, pose=False) if rng.random() < p_pose_free else caption
            for s, c, seed, caption in zip(batch.subjects, batch.contexts, batch.seeds, batch.captions)]


def controlnet_batch(seed: int, step: int, *, size: int, batch_size: int,
                     p_pose_free: float) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Step `step`'s (images, hint captions, pose maps), drawn from (seed, step) alone (training.prefetch)."""
    batch = world_batch(seed, 0, step, size=size, batch_size=batch_size)
    return batch.images, hint_captions(batch, p_pose_free, np.random.default_rng([seed, 1, step])), pose_maps(batch, size)


def train(base: Path, run_dir: Path, steps: int, minutes: float, batch_size: int, resume: bool, seed: int,
          p_pose_free: float, device: str = "cpu", workers: int = 0) -> ControlNetModel:
    ckpt = read_toy_base(base)
    unet, ae, text, tokenizer = load_base_unet(ckpt), ckpt.autoencoder(), ckpt.text_encoder(), ckpt.tokenizer()
    torch.manual_seed(seed)  # the hint encoder's initialisation
    controlnet = build_controlnet(unet)
    unet, ae, text, controlnet = (m.to(device) for m in (unet, ae, text, controlnet))
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-4)
    step, state_path = 0, run_dir / "controlnet_state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        controlnet.load_state_dict(state["controlnet"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    alphas, noise_gen = ddpm_alphas_cumprod().to(device), torch.Generator(device)
    batches = prefetched(partial(controlnet_batch, seed, size=ckpt.spec.image_size, batch_size=batch_size,
                                 p_pose_free=p_pose_free), step, workers)
    drawn = step

    def save(reached: int) -> None:
        torch.save({"controlnet": controlnet.state_dict(), "opt": opt.state_dict(), "step": reached}, state_path)

    def loss() -> torch.Tensor:
        nonlocal drawn
        images, captions, hints = next(batches)
        noise_gen.manual_seed(int(np.random.default_rng([seed, 2, drawn]).integers(2**63)))
        drawn += 1
        with torch.no_grad():
            latents = ae.encode(images.to(device)) * ckpt.latent_scale
            context = text(tokenizer(captions).to(device))
        t = torch.randint(0, len(alphas), (batch_size,), device=device, generator=noise_gen)
        noise = torch.randn(latents.shape, device=device, generator=noise_gen)
        noisy = noised(latents, noise, alphas[t].view(-1, 1, 1, 1))
        down, mid = controlnet(noisy, t, context, hints.to(device), return_dict=False)
        pred = unet(noisy, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        return F.mse_loss(pred, noise)

    step = optimise(loss, opt, step, steps, minutes, save, "controlnet")
    batches.close()
    controlnet.trained_steps = step
    return controlnet


def export(controlnet: ControlNetModel, ckpt: ToyBaseCheckpoint, path: Path) -> None:
    """fp16 safetensors in ComfyUI's LDM ControlNet layout."""
    levels = len(ckpt.spec.unet_channels)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in controlnet_to_ldm(controlnet, levels, ckpt.spec.layers_per_block).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "suti-toy-pose-controlnet", "trained_steps": str(getattr(controlnet, "trained_steps", 0))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--base", type=Path, default=root / "models/toy/suti_toy_base.safetensors")
    parser.add_argument("--run-dir", type=Path, default=Path.home() / ".cache/suti/runs/toy_controlnet")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pose-free-captions", type=float, default=0.5, metavar="P",
                        help="fraction of captions without position/scale words (the hint alone must place the subject)")
    parser.add_argument("--export", type=Path, default=root / "models/controlnet/suti_toy_pose_controlnet.safetensors")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--workers", type=int, default=0, help="processes rendering batches ahead (0: in the loop)")
    args = parser.parse_args()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    controlnet = train(args.base, args.run_dir, args.steps, args.minutes, args.batch_size, args.resume, args.seed,
                       args.pose_free_captions, args.device, args.workers)
    export(controlnet, read_toy_base(args.base), args.export)
    print(f"exported {args.export} after {controlnet.trained_steps} steps")


if __name__ == "__main__":
    main()
