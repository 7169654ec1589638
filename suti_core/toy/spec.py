"""The embedded default's architecture, shared by its trainer (diffusers host) and its ComfyUI loader."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..world import VOCABULARY

TOY_BASE_FORMAT = "suti-toy-base"
TOY_BASE_VERSION = 1


@dataclass(frozen=True)
class ToyBaseSpec:
    """Sizes of the toy base model; the UNet follows the SD1.5 block layout (resnet + spatial transformer per input block), at 1 resnet per level for CPU speed."""

    image_size: int = 128
    latent_channels: int = 4
    ae_widths: tuple[int, ...] = (64, 96)
    ae_stem: int = 4
    ae_decoder_depth: int = 1  # ResBlocks per decoder stage; a decoder fine-tune may deepen it, the encoder never changes
    unet_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    heads: int = 4
    context_dim: int = 128
    text_layers: int = 2
    max_length: int = 24
    vocabulary: tuple[str, ...] = field(default=VOCABULARY)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ToyBaseSpec":
        raw = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
