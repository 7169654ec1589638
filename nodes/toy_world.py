"""SuTI Toy Subject: demonstrations of one subject of the procedural world (the embedded default's photos)."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from ..suti_core.world import NUM_SUBJECTS, caption_for, demo_contexts, render, subject_from_id, subject_split

DEFAULT_SUBJECT = 4653  # a held-out (test split) yellow/blue striped dog


class SuTIToySubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SuTIToySubject",
            display_name="SuTI Toy Subject Demos",
            category="SuTI/toy world",
            description="Render demonstration photos of one subject of the procedural world, with a caption per "
            "photo, for use with the SuTI Load Toy Base model. Test-split subjects were never seen in training.",
            inputs=[
                io.Int.Input("subject_id", default=DEFAULT_SUBJECT, min=0, max=NUM_SUBJECTS - 1, step=1,
                             tooltip="Which subject (shape × pattern × palette × detail). The node's output names its split."),
                io.Int.Input("num_demos", default=3, min=1, max=16, step=1, tooltip="How many demonstration photos to render."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, step=1,
                             tooltip="Chooses the demos' backgrounds, positions and scales."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.String.Output(display_name="captions"),
                     io.String.Output(display_name="class_word"), io.String.Output(display_name="split")],
        )

    @classmethod
    def execute(cls, subject_id: int, num_demos: int, seed: int) -> io.NodeOutput:
        subject = subject_from_id(subject_id)
        contexts = demo_contexts(num_demos, seed)
        images = np.stack([render(subject, c, seed=seed + i) for i, c in enumerate(contexts)])
        captions = "\n".join(caption_for(subject, c, seed + i) for i, c in enumerate(contexts))
        pixels = torch.from_numpy(images).float() / 255.0                      # (B, H, W, 3) in [0, 1]
        return io.NodeOutput(pixels, captions, subject.shape, subject_split(subject_id))
