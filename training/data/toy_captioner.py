"""A captioner for the toy world's crawls (synth-crawl), speaking `recaption`'s command protocol (captioners.py):

    python -m training.data recaption --in CLUSTERS --out DIR --command "python -m training.data.toy_captioner"

Why the render filter: the toy world has no pretrained captioner, and its evaluation judge (models/eval) is a
measuring instrument that must never choose or write training data. The render filter (training/render_filter.py,
models/filter/render_filter.safetensors) is a separate network of the judge's architecture trained apart from it
for exactly this job of reading training images, and its heads name what a world caption says: the shape (the
class word) and the context (background, position, scale, style, accessory, state). The caption is
`suti_core.world.caption_for(shape, context)`, its wording drawn from the image's key, so it reads back with
`parse_caption`. It never names the identity (pattern, palette), as the world's captions never do, nor a recolour
(a recoloured subject and one born in that colour look the same). An image the network is unsure of (mean top
probability of those heads below --min-confidence) gets an empty line, which `recaption` drops as `empty caption`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from suti_core.eval.judge import CONTEXT_HEADS, IDENTITY_HEADS, Judge
from suti_core.eval.metrics import judge_logits, to_tensor
from suti_core.world import Context, caption_for

from ..render_filter import DEFAULT_FILTER, RenderFilter
from .common import square_image

CAPTION_HEADS = ("shape", *CONTEXT_HEADS)
BATCH = 64


def read_image(probs: dict[str, torch.Tensor], key: str, min_confidence: float) -> str:
    """One image's caption from its heads' probabilities ({head: (n_classes,)}); "" when the reading is unsure."""
    if float(torch.stack([probs[h].max() for h in CAPTION_HEADS]).mean()) < min_confidence:
        return ""
    shape, *context = ((IDENTITY_HEADS | CONTEXT_HEADS)[h][int(probs[h].argmax())] for h in CAPTION_HEADS)
    variant = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return caption_for(shape, Context(**dict(zip(CONTEXT_HEADS, context))), variant)


def caption_images(network: Judge, images: list[Image.Image], keys: list[str], min_confidence: float) -> list[str]:
    """Captions of `images` (any size: their centred square is read at the network's input size)."""
    captions = []
    for start in range(0, len(images), BATCH):
        batch = [np.asarray(square_image(image, network.input_size)) for image in images[start:start + BATCH]]
        with torch.no_grad():
            logits = judge_logits(to_tensor(batch), network)  # {head: (B, n_classes)}
        probs = {h: p.softmax(dim=-1) for h, p in logits.items()}
        captions += [read_image({h: p[i] for h, p in probs.items()}, key, min_confidence)
                     for i, key in enumerate(keys[start:start + BATCH])]
    return captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", type=Path, default=DEFAULT_FILTER, help="render filter weights (never the judge)")
    parser.add_argument("--min-confidence", type=float, default=0.7,
                        help="least mean top probability of the read heads for a caption")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    network = RenderFilter.load(args.filter).network  # refuses any file that is not a render filter
    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    images = []
    for request in requests:
        with Image.open(request["path"]) as image:
            images.append(image.convert("RGB"))
    for caption in caption_images(network, images, [r["key"] for r in requests], args.min_confidence):
        print(caption)


if __name__ == "__main__":
    main()
