"""Fine-tune only the decoder of a toy base file, the encoder frozen (as SD's ft-MSE VAE was made).

    python -m training.toy_decoder --steps 2000 --depth 3 --resume

The UNet was trained on the encoder's latents, so the encoder must never move; the decoder may, and every
step it trains makes reconstructions (hence every generated image) keep more of a subject's identity.
`--depth` deepens the decoder (more ResBlocks per stage): the new blocks start as identities (zero last
conv), so training starts from exactly the old decoder. Writes a copy of the base file with new
vae.decoder.* tensors, the spec's decoder depth and `decoder_steps` in its metadata; the UNet, text
encoder and latent scale are copied bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from suti_core.toy.autoencoder import ResBlock, ToyAutoencoder
from suti_core.toy.checkpoint import read_toy_base

from .loop import optimise
from .toy_data import WorldSampler

PACK_ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = Path.home() / ".cache/suti/runs/toy_decoder"


def deepen(ae: ToyAutoencoder, spec, depth: int) -> ToyAutoencoder:
    """`ae` with `depth` ResBlocks per decoder stage; blocks it lacks are added as identities."""
    deeper = ToyAutoencoder.from_spec(dataclasses.replace(spec, ae_decoder_depth=depth))
    deeper.encoder.load_state_dict(ae.encoder.state_dict())
    old = list(ae.decoder)
    for module in deeper.decoder:
        if isinstance(module, ResBlock) and not isinstance(old[0], ResBlock):
            nn.init.zeros_(module.body[-1].weight), nn.init.zeros_(module.body[-1].bias)  # x + 0: identity
            continue
        module.load_state_dict(old.pop(0).state_dict())
    assert not old, f"decoder of depth {spec.ae_decoder_depth} cannot be made {depth} deep"
    return deeper.eval().requires_grad_(False)


def train(base: Path, run_dir: Path, steps: int, minutes: float, batch_size: int, lr: float, resume: bool,
          seed: int, depth: int | None = None) -> tuple[torch.nn.Module, int]:
    """(decoder, steps done); checkpoints run_dir/state.pt every 4 minutes."""
    ckpt = read_toy_base(base)
    ae = ckpt.autoencoder()
    if depth is not None and depth != ckpt.spec.ae_decoder_depth:
        ae = deepen(ae, ckpt.spec, depth)
    decoder = ae.decoder.train().requires_grad_(True)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    step, state_path = 0, run_dir / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        decoder.load_state_dict(state["decoder"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    sampler = WorldSampler("train", ckpt.spec.image_size, seed + step, p_edit=0.3)

    def save(reached: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"decoder": decoder.state_dict(), "opt": opt.state_dict(), "step": reached}, tmp)
        tmp.replace(state_path)

    def loss() -> torch.Tensor:
        images = sampler.batch(batch_size).images
        with torch.no_grad():
            latents = ae.encoder(images)
        recon = decoder(latents)
        return F.l1_loss(recon, images) + F.mse_loss(recon, images)

    step = optimise(loss, opt, step, steps, minutes, save, "decoder")
    return decoder.eval(), step


def export(decoder: torch.nn.Module, steps: int, base: Path, path: Path) -> None:
    """A copy of `base` whose vae.decoder.* are the fine-tuned weights (fp16), with its depth and steps recorded."""
    with safe_open(str(base), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("vae.decoder.")}
    new = {f"vae.decoder.{k}": v.detach().to(torch.float16).contiguous() for k, v in decoder.state_dict().items()}
    depth = sum(isinstance(m, ResBlock) for m in decoder) // len(read_toy_base(base).spec.ae_widths)
    metadata["spec"] = json.dumps(json.loads(metadata["spec"]) | {"ae_decoder_depth": depth})
    metadata["decoder_steps"] = str(int(metadata.get("decoder_steps", 0)) + steps)  # a fine-tuned base may be tuned again
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors | new, str(tmp), metadata=metadata)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=PACK_ROOT / "models/toy/suti_toy_base.safetensors")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--minutes", type=float, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--depth", type=int, help="ResBlocks per decoder stage (default: the base's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--export", type=Path, default=RUN_DIR / "suti_toy_base.safetensors",
                        help="where the fine-tuned copy goes (never the --base file itself)")
    args = parser.parse_args()
    if args.export.resolve() == args.base.resolve():
        raise SystemExit("--export must differ from --base: the base file is read while the copy is written; "
                         "copy the export over it once you have checked it")
    torch.set_num_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    decoder, steps = train(args.base, args.run_dir, args.steps, args.minutes, args.batch_size, args.lr, args.resume, args.seed,
                           args.depth)
    export(decoder, steps, args.base, args.export)
    print(f"exported {args.export} after {steps} decoder steps")


if __name__ == "__main__":
    main()
