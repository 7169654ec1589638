"""The expert as a ComfyUI artefact: one .safetensors file that the stock LoraLoader reads.

UNet keys are kohya names over ComfyUI's own LDM parameter names (`lora_unet_input_blocks_1_1_..._to_q`):
`comfy.lora.model_lora_keys_unet` derives that name from every model's state dict, so the same layout maps
for the toy base as the pack loads it, SD1.x and SDXL. A LoRA expert stores `lora_down` / `lora_up` /
`alpha`; a full fine-tune stores the UNet delta as `.diff` / `.diff_b` (ComfyUI's full-weight patch). The
identifier row goes to CLIP as a rank-1 patch of the token table (`text_encoders.<table>`), so the
LoraLoader's strength_clip applies it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from .expert_text import ClipText, ToyText
from .keymap import diffusers_to_ldm_key, unet_key_map

EXPERT_FORMAT = "suti-dreambooth-expert"


def ldm_modules(unet: UNet2DConditionModel) -> dict[str, str]:
    """The diffusers -> LDM module map for this UNet's layout (levels, resnets per level, attention per level)."""
    config = unet.config
    return unet_key_map(len(config.block_out_channels), config.layers_per_block,
                        tuple("CrossAttn" in t for t in config.down_block_types))


def _kohya(diffusers_key: str, modules: dict[str, str]) -> tuple[str, str]:
    """('lora_unet_<ldm module with _>', 'weight' | 'bias') for one diffusers parameter name."""
    module, kind = diffusers_to_ldm_key(diffusers_key, modules).rsplit(".", 1)
    return "lora_unet_" + module.replace(".", "_"), kind


def unet_lora_tensors(unet: UNet2DConditionModel, alpha: float) -> dict[str, torch.Tensor]:
    """The peft LoRA of `unet` (lora_A / lora_B per adapted linear) as lora_down / lora_up / alpha."""
    from peft import get_peft_model_state_dict

    modules, out = ldm_modules(unet), {}
    for key, value in get_peft_model_state_dict(unet).items():  # "<module>.lora_A.weight"
        module, part, _ = key.rsplit(".", 2)
        name, _ = _kohya(f"{module}.weight", modules)
        out[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def unet_delta_tensors(unet: UNet2DConditionModel, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trained - base for every UNet parameter that changed, as ComfyUI `.diff` (weights) / `.diff_b` (biases)."""
    modules, out = ldm_modules(unet), {}
    for key, value in unet.state_dict().items():
        delta = value - base_state[key]
        if delta.any():
            name, kind = _kohya(key, modules)
            out[f"{name}.{'diff' if kind == 'weight' else 'diff_b'}"] = delta
    return out


def identifier_tensors(text: ToyText | ClipText) -> dict[str, torch.Tensor]:
    """Each token table's learned identifier row as a rank-1 LoRA: up = one-hot row (V, 1), down = delta (1, D)."""
    out = {}
    for table, embedding in zip(text.comfy_tables, text.identifiers):
        up = torch.zeros(embedding.table.num_embeddings, 1)
        up[embedding.token_id] = 1.0
        name = f"text_encoders.{table}"
        out |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": embedding.delta.detach()[None],
                f"{name}.alpha": torch.tensor(1.0)}
    return out


def save_expert(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write fp16 weights (alphas stay fp32) atomically, from the CPU whatever device trained them; returns the bytes
    stored."""
    stored = {k: (v if k.endswith(".alpha") else v.detach().to(torch.float16)).cpu().contiguous()
              for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(stored, str(tmp), metadata={"format": EXPERT_FORMAT, **metadata})
    tmp.replace(path)
    return path.stat().st_size
