"""Reading the embedded default's single safetensors file (unet.* in LDM names, text_encoder.*, vae.*)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .autoencoder import ToyAutoencoder
from .spec import TOY_BASE_FORMAT, TOY_BASE_VERSION, ToyBaseSpec
from .text_encoder import ToyTextEncoder, WordTokenizer


@dataclass
class ToyBaseCheckpoint:
    spec: ToyBaseSpec
    latent_scale: float
    unet_state: dict[str, torch.Tensor]    # LDM (ComfyUI openaimodel) names
    text_state: dict[str, torch.Tensor]
    vae_state: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def autoencoder(self) -> ToyAutoencoder:
        ae = ToyAutoencoder.from_spec(self.spec)
        ae.load_state_dict({k: v.float() for k, v in self.vae_state.items()})
        return ae.eval().requires_grad_(False)

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.spec.vocabulary, self.spec.max_length)

    def text_encoder(self) -> ToyTextEncoder:
        spec = self.spec
        encoder = ToyTextEncoder(len(self.tokenizer().words), spec.context_dim, spec.text_layers, 4, spec.max_length)
        encoder.load_state_dict({k: v.float() for k, v in self.text_state.items()})
        return encoder.eval().requires_grad_(False)


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_toy_base(path: str | Path) -> ToyBaseCheckpoint:
    """Load and check a toy base file; errors say what is wrong with the file and how to get a good one."""
    path = Path(path)
    fix = "re-export it with `python -m training.toy_base` or restore it with `git checkout models/toy`"
    if not path.is_file():
        raise FileNotFoundError(f"toy base model {path} does not exist; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); {fix}") from err
    if metadata.get("format") != TOY_BASE_FORMAT:
        raise ValueError(f"{path} is not a SuTI toy base model (format {metadata.get('format')!r}); {fix}")
    if int(metadata.get("version", -1)) != TOY_BASE_VERSION:
        raise ValueError(f"{path} has toy base version {metadata.get('version')}, this pack reads "
                         f"{TOY_BASE_VERSION}; {fix}")
    return ToyBaseCheckpoint(ToyBaseSpec.from_json(metadata["spec"]), float(metadata["latent_scale"]),
                             _split(tensors, "unet."), _split(tensors, "text_encoder."), _split(tensors, "vae."),
                             metadata)
