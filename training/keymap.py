"""The one key map between diffusers' UNet2DConditionModel and ComfyUI/LDM `openaimodel.UNetModel` names."""
from __future__ import annotations

from collections.abc import Mapping

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's added conditioning


def _module_map(levels: int, layers_per_block: int, attention: tuple[bool, ...]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix (before the resnet-internal renames)."""
    n = layers_per_block
    out = dict(_TOP)
    for i in range(levels):
        for j in range(n):
            ldm = f"input_blocks.{1 + i * (n + 1) + j}"
            out[f"down_blocks.{i}.resnets.{j}"] = f"{ldm}.0"
            if attention[i]:
                out[f"down_blocks.{i}.attentions.{j}"] = f"{ldm}.1"
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{1 + i * (n + 1) + n}.0.op"
    up_attention = attention[::-1]
    for i in range(levels):
        for j in range(n + 1):
            ldm = f"output_blocks.{i * (n + 1) + j}"
            out[f"up_blocks.{i}.resnets.{j}"] = f"{ldm}.0"
            if up_attention[i]:
                out[f"up_blocks.{i}.attentions.{j}"] = f"{ldm}.1"
        if i < levels - 1:
            out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (n + 1) + n}.{2 if up_attention[i] else 1}.conv"
    out.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                "mid_block.resnets.1": "middle_block.2"})
    return out


def diffusers_to_ldm_key(key: str, modules: Mapping[str, str]) -> str:
    """One diffusers parameter name -> its LDM name; raises KeyError for names outside the map."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            rest = parts[cut:]
            if ".resnets." in prefix and rest[0] in _RESNET:
                rest = _RESNET[rest[0]].split(".") + rest[1:]
            return ".".join([modules[prefix]] + rest)
    raise KeyError(f"no LDM name for diffusers key {key!r}")


def unet_key_map(levels: int, layers_per_block: int, attention: tuple[bool, ...]) -> dict[str, str]:
    """The module-prefix map for a UNet with this layout (levels, resnets per level, attention per level)."""
    if len(attention) != levels:
        raise ValueError(f"attention flags {attention} do not match {levels} levels")
    return _module_map(levels, layers_per_block, attention)


def convert_diffusers_unet(state_dict: Mapping[str, "object"], modules: Mapping[str, str]) -> dict[str, "object"]:
    """A diffusers UNet state dict renamed to LDM keys (tensors shared, not copied)."""
    return {diffusers_to_ldm_key(k, modules): v for k, v in state_dict.items()}
