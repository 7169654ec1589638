"""Does the toy pose ControlNet put the subject where its silhouette map says?

    python -m benchmarks.pose_control                  # 96 held-out prompts, shipped base + ControlNet
    python -m benchmarks.pose_control --controlnet ~/.cache/suti/runs/toy_controlnet/pose_controlnet.safetensors

Prompts leave position and scale out (caption_for(..., pose=False): what a ControlNet user writes); the hint
is the silhouette map of the subject in the full context. The judge's position and scale heads then say
whether each image follows the hint. Rows: renderer truth (ceiling), base model without the ControlNet (the
prior: where it puts a subject when nobody says), base + ControlNet through ComfyUI's stock loader and
ControlNetApplyAdvanced. Means ± stderr over held-out (test-split) subjects, seeded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from suti_core.eval.metrics import DEFAULT_JUDGE, default_judge, mean_stderr, text_fidelity
from suti_core.world import caption_for, pose_map

from .quality import DEFAULT_BASE, PACK_ROOT, BaseTextOnly, Prompt, held_out_prompts, markdown_table, renderer_truth

DEFAULT_CONTROLNET = PACK_ROOT / "models/controlnet/suti_toy_pose_controlnet.safetensors"
POSE_ATTRIBUTES = ("position", "scale", "background", "shape")


def pose_free(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The same cases with captions that leave position and scale to the hint."""
    return [replace(p, caption=caption_for(p.subject.shape, p.context, p.seed, pose=False)) for p in prompts]


def pose_hints(prompts: Sequence[Prompt]) -> torch.Tensor:
    """(B, 128, 128, 3) silhouette maps in [0, 1]: a ComfyUI IMAGE batch, one hint per prompt."""
    return torch.from_numpy(np.stack([pose_map(p.subject, p.context, 128, p.seed) for p in prompts]))


class PoseControlled(BaseTextOnly):
    """The base model with the pose ControlNet, loaded and applied by ComfyUI's stock nodes."""

    def __init__(self, base: Path, controlnet: Path, strength: float = 1.0, **sampling):
        super().__init__(base, **sampling)
        import comfy.controlnet
        import nodes

        self.control_net = comfy.controlnet.load_controlnet(str(controlnet))  # what the stock ControlNetLoader calls
        self.apply = nodes.ControlNetApplyAdvanced()
        self.strength = strength

    def conditioning(self, part: Sequence[Prompt]) -> tuple[list, list]:
        positive, negative = super().conditioning(part)
        return self.apply.apply_controlnet(positive, negative, self.control_net, pose_hints(part), self.strength, 0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--controlnet", type=Path, default=DEFAULT_CONTROLNET)
    parser.add_argument("--subjects", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=2, help="contexts per subject")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", type=Path, default=DEFAULT_JUDGE)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path, what in ((args.base, "toy base"), (args.controlnet, "pose ControlNet (python -m training.toy_controlnet)")):
        if not path.is_file():
            raise SystemExit(f"no {what} at {path}")
    start = time.time()
    prompts = pose_free(held_out_prompts(args.subjects, args.prompts, args.seed, p_edit=0.15))
    sampling = dict(steps=args.steps, cfg=args.cfg)
    methods = {"renderer truth (ceiling)": renderer_truth,
               "base model, no ControlNet (prior)": BaseTextOnly(args.base, **sampling),
               f"base + pose ControlNet (strength {args.strength:g})": PoseControlled(args.base, args.controlnet, args.strength, **sampling)}
    judge, results = default_judge(str(args.judge)), {}
    for name, method in methods.items():
        scores = text_fidelity(method(prompts), [p.context for p in prompts], [p.subject.shape for p in prompts], judge)
        results[name] = {f"text/{a}": mean_stderr(scores[a]) for a in POSE_ATTRIBUTES}
        print(f"[{name} done at {time.time() - start:.0f}s]", file=sys.stderr)
    print(f"{len(prompts)} held-out prompts without position/scale words; hint = the subject's silhouette; "
          f"controlnet {args.controlnet.name}\n")
    print(markdown_table(results, [f"text/{a}" for a in POSE_ATTRIBUTES]))
    print(f"\nruntime {time.time() - start:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
