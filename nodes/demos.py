"""SuTI Demonstrations: demo images + one caption each -> latents and caption conditioning, and a preview."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence

import comfy.model_management
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.utils
import torch
from comfy_api.latest import io

from ..suti_core.demo_features import MAX_DEMOS, Demonstration, parse_demo_weights
from .toy_base import ToyTextModel

DemosType = io.Custom("SUTI_DEMOS")
AUTO_SIZE = 0
FALLBACK_SIZE = 512
# (text encoder classes, native image size, name): SDXL's refiner encoder subclasses SD1's, so SDXL comes first;
# SD2.x's subclasses SD1's too (its 768-v models share it with the 512 ones, so they cannot be told apart).
NATIVE_SIZES = (
    ((comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLRefinerClipModel), 1024, "SDXL"),
    ((ToyTextModel,), 128, "toy base"),
    ((comfy.sd1_clip.SD1ClipModel,), 512, "SD1.x/SD2.x"),
)
PREVIEW_DIM = 0.3  # brightness the preview keeps outside a subject mask


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) with C in {1, 3, 4} -> RGB; alpha is composited over white."""
    channels = images.shape[-1]
    if channels == 1:
        return images.expand(-1, -1, -1, 3)
    if channels == 4:
        rgb, alpha = images[..., :3], images[..., 3:]
        return rgb * alpha + (1.0 - alpha)
    if channels == 3:
        return images
    raise ValueError(f"demo images have {channels} channels; SuTI takes grayscale (1), RGB (3) or RGBA (4) images")


def square_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to `size` and center-crop to size x size: (B, H, W, 3) -> (B, size, size, 3)."""
    method = "area" if min(images.shape[1:3]) >= size else "bicubic"
    pixels = comfy.utils.common_upscale(images.movedim(-1, 1), size, size, method, "center")
    return pixels.movedim(1, -1).clamp(0.0, 1.0)


def strip_invisible(text: str) -> str:
    """Strip whitespace and invisible format characters (Unicode Cf: zero-width space/joiner, BOM) from both ends,
    so a line of only those counts as empty; inner ones (emoji ZWJ sequences) stay."""
    visible = [i for i, char in enumerate(text) if not (char.isspace() or unicodedata.category(char) == "Cf")]
    return text[visible[0] : visible[-1] + 1] if visible else ""


def split_captions(text: str, count: int) -> list[str]:
    """One caption per line, exactly `count` of them, none empty (or only invisible characters)."""
    text = strip_invisible(text)
    lines = [strip_invisible(line) for line in text.splitlines()]
    if len(lines) != count or not text:
        found = len(lines) if text else 0
        raise ValueError(f"got {count} demo images but {found} captions; write one caption per line, one per image")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise ValueError(
                f"caption {number} of {count} is empty; describe demo {number} in its line (e.g. 'a photo of my dog')"
            )
    return lines


def native_demo_size(clip) -> int:
    """The checkpoint's native image size, told by its text encoder's class (SD VAEs are all alike; SDXL's
    two-encoder CLIP is not); FALLBACK_SIZE with a warning when the encoder is not one ComfyUI ships for SD."""
    text_model = getattr(clip, "cond_stage_model", None)
    for classes, size, name in NATIVE_SIZES:
        if isinstance(text_model, classes):
            logging.info("SuTI: demo size auto: %d px (%s text encoder)", size, name)
            return size
    logging.warning(
        "SuTI: cannot tell the checkpoint's image size from its text encoder (%s); demos are made at %d px. "
        "Set SuTI Demonstrations' size to the size the checkpoint was trained at.",
        type(text_model if text_model is not None else clip).__name__, FALLBACK_SIZE,
    )
    return FALLBACK_SIZE


def demo_preview(pixels: torch.Tensor, masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The cropped demos (B, size, size, 3) with what their subject masks leave out dimmed: the part SuTI Apply
    does not attend to."""
    if masks[0] is None:  # masks come for every demo or for none
        return pixels
    # > 0.5: the rule by which demo_token_mask keeps a demo's tokens
    subject = (torch.stack(list(masks)) > 0.5).to(pixels.device)[..., None]  # (B, size, size, 1)
    return torch.where(subject, pixels, pixels * PREVIEW_DIM)


def encode_caption(clip, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP conditioning (1, T, D) and pooled output (1, P) of one caption."""
    out = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True, return_dict=True)
    return out["cond"], out.get("pooled_output")


def check_demo_count(new: int, previous: int) -> None:
    if new == 0:
        raise ValueError("no demo images: connect an IMAGE batch with 1 to 16 pictures of the subject")
    if new + previous > MAX_DEMOS:
        raise ValueError(
            f"{new + previous} demos is more than the limit of {MAX_DEMOS}: every demo adds its tokens to every "
            f"attention layer, so memory and time grow with each one. Use 3-5 of your best pictures (at most {MAX_DEMOS})."
        )
    if new + previous == 1:
        logging.warning("SuTI: only one demonstration; 3-5 pictures of the subject usually work better")


def crop_subject_masks(masks: torch.Tensor | None, images: torch.Tensor, size: int) -> list[torch.Tensor | None]:
    """MASK (B, H, W) or (H, W), one per image, cropped as the images are -> B masks (size, size); None: no masks."""
    if masks is None:
        return [None] * images.shape[0]
    masks = masks[None] if masks.ndim == 2 else masks
    if masks.shape[0] != images.shape[0]:
        raise ValueError(
            f"got {images.shape[0]} demo images but {masks.shape[0]} subject masks; give one mask per image "
            "(white = the subject) or leave subject_masks unconnected"
        )
    if masks.shape[1:] != images.shape[1:3]:
        raise ValueError(
            f"subject masks are {masks.shape[2]}x{masks.shape[1]} but the demo images are "
            f"{images.shape[2]}x{images.shape[1]}; make each mask from its own image (same size)"
        )
    cropped = square_crop(masks[..., None].float(), size)[..., 0]  # (B, size, size)
    if bool((cropped.flatten(1).amax(dim=1) < 0.5).any()):
        raise ValueError("a subject mask is empty after cropping (no pixel >= 0.5); mask the subject in every demo")
    return list(cropped)


@torch.no_grad()
def make_demonstrations(images: torch.Tensor, captions: str, vae, clip, size: int,
                        masks: torch.Tensor | None = None, weights: str = "") -> list[Demonstration]:
    """Encode each image with the VAE and its caption with CLIP; keep each subject mask at `size` and weight."""
    lines = split_captions(captions, images.shape[0])
    demo_weights = parse_demo_weights(weights, images.shape[0])
    pixels = square_crop(to_rgb(images), size)
    subject = crop_subject_masks(masks, images, size)
    demos = []
    for index, caption in enumerate(lines):
        comfy.model_management.throw_exception_if_processing_interrupted()
        cond, pooled = encode_caption(clip, caption)
        latent = vae.encode(pixels[index : index + 1])  # (1, C, size/8, size/8)
        pooled = None if pooled is None else pooled.cpu()
        demos.append(Demonstration(latent.cpu(), cond.cpu(), pooled, caption, subject[index], demo_weights[index]))
    return demos


class SuTIDemonstrations(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SuTIDemonstrations",
            display_name="SuTI Demonstrations",
            category="SuTI",
            description="Pictures of one subject with a caption each; chain nodes to mix image sizes. "
            "demo_preview shows the demos as SuTI encodes them (wire it to Preview Image).",
            inputs=[
                io.Image.Input(
                    "images",
                    tooltip="Pictures of the subject (3-5 typical, 1-16 allowed). Grayscale and RGBA are converted to RGB.",
                ),
                io.String.Input(
                    "captions",
                    multiline=True,
                    default="",
                    tooltip="One caption per line, one line per image, in batch order (e.g. 'a photo of my dog on grass').",
                ),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint you sample with."),
                io.Clip.Input(
                    "clip", tooltip="The CLIP of the checkpoint you sample with; encodes each demo's caption."
                ),
                io.Int.Input(
                    "size",
                    default=AUTO_SIZE,
                    min=0,
                    max=2048,
                    step=8,
                    tooltip="Demos are resized and center-cropped to size x size pixels (a multiple of 8, 64-2048). "
                    "0 = auto, the checkpoint's own size told by its CLIP: 1024 for SDXL, 512 for SD1.x and SD2.x "
                    "(set 768 for an SD2.x 768-v model: its CLIP is the same), 128 for the toy base.",
                ),
                DemosType.Input(
                    "demos", optional=True, tooltip="Demos from another SuTI Demonstrations node to append to."
                ),
                io.Mask.Input(
                    "subject_masks",
                    optional=True,
                    tooltip="Optional: one mask per image, white on the subject (draw it or use a segmentation "
                    "node). SuTI then attends only to the subject in the demos, so their backgrounds cannot leak.",
                ),
                io.String.Input(
                    "demo_weights",
                    optional=True,
                    default="",
                    tooltip="Optional: how much each demo counts, one number >= 0 per image in batch order "
                    "(e.g. '1, 0.5, 1'); empty = all 1. A weight scales the demo's share of SuTI's attention "
                    "(2 = twice the pull of a weight-1 demo, 0 = left out); equal weights change nothing.",
                ),
            ],
            outputs=[
                DemosType.Output(display_name="demos"),
                io.Image.Output(
                    display_name="demo_preview",
                    tooltip="This node's demos as SuTI encodes them: cropped and resized, dimmed outside the "
                    "subject masks (the part SuTI Apply leaves out). For Preview Image.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, size: int | None = None) -> bool | str:
        if size is not None and size != AUTO_SIZE and (size < 64 or size > 2048 or size % 8):
            return f"size {size} must be 0 (auto) or a multiple of 8 between 64 and 2048"
        return True

    @classmethod
    def execute(
        cls, images: torch.Tensor, captions: str, vae, clip, size: int, demos=None, subject_masks=None,
        demo_weights: str = "",
    ) -> io.NodeOutput:
        previous = tuple(demos or ())
        check_demo_count(images.shape[0], len(previous))
        size = native_demo_size(clip) if size == AUTO_SIZE else size
        new = make_demonstrations(images, captions, vae, clip, size, subject_masks, demo_weights or "")
        preview = demo_preview(square_crop(to_rgb(images), size), [demo.mask for demo in new])
        return io.NodeOutput(previous + tuple(new), preview)
