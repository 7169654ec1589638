"""The embedded default in ComfyUI: MODEL, CLIP and VAE built with ComfyUI's own classes.

The UNet is ComfyUI's `openaimodel.UNetModel` in an SD1.5-like layout, so everything downstream
(CLIPTextEncode, KSampler, VAEDecode, ControlNet, SuTI Apply) treats it like any SD1.x model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
import torch
from comfy import latent_formats, model_base, model_management, model_patcher, sd, supported_models_base
from comfy_api.latest import io

from ..suti_core.toy.checkpoint import ToyBaseCheckpoint, read_toy_base
from ..suti_core.toy.spec import ToyBaseSpec
from ..suti_core.toy.text_encoder import ToyTextEncoder, WordTokenizer

TOY_MODELS_DIR = Path(__file__).resolve().parents[1] / "models" / "toy"
TOY_CONTROLNET_DIR = Path(__file__).resolve().parents[1] / "models" / "controlnet"


def register_toy_controlnets() -> None:
    """List the pack's pose ControlNet for the toy base in the stock ControlNetLoader (idempotent)."""
    folder_paths.add_model_folder_path("controlnet", str(TOY_CONTROLNET_DIR))


def comfy_unet_config(spec: ToyBaseSpec) -> dict:
    """ComfyUI UNetModel arguments matching training's diffusers UNet (cross-attention at every level)."""
    levels = len(spec.unet_channels)
    mult = [c // spec.unet_channels[0] for c in spec.unet_channels]
    return {
        "image_size": spec.image_size // 8, "in_channels": spec.latent_channels, "out_channels": spec.latent_channels,
        "model_channels": spec.unet_channels[0], "channel_mult": mult, "num_res_blocks": [spec.layers_per_block] * levels,
        "transformer_depth": [1] * (levels * spec.layers_per_block), "transformer_depth_middle": 1,
        "transformer_depth_output": [1] * (levels * (spec.layers_per_block + 1)), "context_dim": spec.context_dim,
        "num_heads": spec.heads, "num_head_channels": -1, "use_linear_in_transformer": False,
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


class ToyModelConfig(supported_models_base.BASE):
    """Model config for the toy base: eps prediction on SD's discrete schedule, fp32 weights."""

    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0
    unet_extra_config = {}  # BASE's default would override num_heads with SD's 64-channel heads
    suti_architecture = "toy"  # what SuTI adapters for this base declare

    def __init__(self, spec: ToyBaseSpec, latent_scale: float):
        super().__init__(comfy_unet_config(spec))
        self.latent_format = latent_formats.LatentFormat()
        self.latent_format.scale_factor = latent_scale
        self.latent_format.latent_channels = spec.latent_channels


def build_model(ckpt: ToyBaseCheckpoint) -> model_patcher.ModelPatcher:
    config = ToyModelConfig(ckpt.spec, ckpt.latent_scale)
    load_device = model_management.get_torch_device()
    config.set_inference_dtype(torch.float32, None)
    model = model_base.BaseModel(config, device=model_management.unet_inital_load_device(0, torch.float32))
    missing, unexpected = model.diffusion_model.load_state_dict({k: v.float() for k, v in ckpt.unet_state.items()})
    if missing or unexpected:
        raise ValueError(f"toy base UNet weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model_patcher.ModelPatcher(model, load_device=load_device, offload_device=model_management.unet_offload_device())


class ToyTokenizer:
    """ComfyUI tokenizer interface over the toy word tokenizer: one chunk of max_length tokens (longer prompts
    are cut, as the toy world's captions never need more); prompt weights like (word:1.2) are ignored."""

    def __init__(self, tokenizer: WordTokenizer, embedding_directory=None, tokenizer_data=None):
        self.tokenizer = tokenizer

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"toy": [[(token, 1.0) for token in self.tokenizer.encode(text)]]}

    def untokenize(self, token_weight_pair):
        return [(t, self.tokenizer.words[t[0]]) for t in token_weight_pair]

    def state_dict(self) -> dict:
        return {}


class ToyTextModel(torch.nn.Module):
    """ComfyUI text-encoder interface: token/weight pairs -> (cond (1, T, D), pooled (1, D))."""

    def __init__(self, encoder: ToyTextEncoder, device=None, dtype=None, model_options=None):
        super().__init__()
        self.encoder = encoder.to(device=device)
        self.dtypes = {torch.float32}

    def encode_token_weights(self, token_weight_pairs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.encoder.parameters()).device
        (chunk,) = token_weight_pairs["toy"]
        cond = self.encoder(torch.tensor([[t for t, _ in chunk]], device=device))  # (1, T, D)
        out = model_management.intermediate_device()
        return cond.to(out), cond.mean(dim=1).to(out)

    def set_clip_options(self, options: dict) -> None:
        pass  # no layer skipping or projection choices in a 2-layer toy encoder

    def reset_clip_options(self) -> None:
        pass

    def load_sd(self, state_dict: dict):
        return self.encoder.load_state_dict(state_dict, strict=False)


class _ToyClipTarget:
    def __init__(self, ckpt: ToyBaseCheckpoint):
        encoder, tokenizer = ckpt.text_encoder(), ckpt.tokenizer()
        self.params = {}
        self.clip = lambda device=None, dtype=None, model_options=None: ToyTextModel(encoder, device, dtype)
        self.tokenizer = lambda embedding_directory=None, tokenizer_data=None: ToyTokenizer(tokenizer)


class ToyVAE(sd.VAE):
    """ComfyUI's VAE wrapper around the toy f=8 autoencoder (ComfyUI's SD defaults: 4 channels, [-1, 1])."""

    def __init__(self, ckpt: ToyBaseCheckpoint):
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the base class warns that an empty state dict holds no VAE
        try:
            super().__init__(sd={})
        finally:
            logging.disable(previous)
        self.first_stage_model = ckpt.autoencoder()
        self.latent_channels = ckpt.spec.latent_channels
        self.memory_used_encode = lambda shape, dtype: 400 * shape[2] * shape[3] * model_management.dtype_size(dtype)
        self.memory_used_decode = lambda shape, dtype: 400 * 64 * shape[2] * shape[3] * model_management.dtype_size(dtype)
        self.working_dtypes = [torch.float32]
        self.device = model_management.vae_device()
        self.vae_dtype = torch.float32
        self.output_device = model_management.intermediate_device()
        self.patcher = model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                  offload_device=model_management.vae_offload_device())


def load_toy_base(path: str | Path) -> tuple[model_patcher.ModelPatcher, sd.CLIP, ToyVAE]:
    """MODEL, CLIP, VAE of a toy base file."""
    ckpt = read_toy_base(path)
    clip = sd.CLIP(target=_ToyClipTarget(ckpt), model_options={"dtype": torch.float32})
    return build_model(ckpt), clip, ToyVAE(ckpt)


def toy_base_choices() -> list[str]:
    return sorted(p.name for p in TOY_MODELS_DIR.glob("*.safetensors"))


class SuTILoadToyBase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SuTILoadToyBase",
            display_name="SuTI Load Toy Base",
            category="SuTI/loaders",
            description="Load the pack's embedded default: a small latent diffusion model trained on the procedural "
            "subject world (128×128 images, 16×16×4 latents). Use stock CLIPTextEncode, KSampler and VAEDecode with it.",
            inputs=[io.Combo.Input("base_name", options=toy_base_choices(),
                                   tooltip="A toy base model shipped in the pack's models/toy folder.")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def validate_inputs(cls, base_name: str) -> bool | str:
        if (TOY_MODELS_DIR / base_name).is_file():
            return True
        return (f"toy base '{base_name}' is not in {TOY_MODELS_DIR}; restore the pack's models/toy folder "
                "(git checkout models/toy) or train one with `python -m training.toy_base`")

    @classmethod
    def execute(cls, base_name: str) -> io.NodeOutput:
        return io.NodeOutput(*load_toy_base(TOY_MODELS_DIR / base_name))
