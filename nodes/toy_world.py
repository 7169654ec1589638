"""Toy-world sources: a subject's demonstration photos, and pose maps for the toy pose ControlNet."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..suti_core.world import NUM_SUBJECTS, Context, pose_map, render_demos, subject_from_id, subject_split
from ..suti_core.world.context import POSITIONS, SCALES, STATES
from ..suti_core.world.subjects import SHAPES, first_subject_of_shape

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
                     io.String.Output(display_name="class_word"), io.String.Output(display_name="split"),
                     io.Mask.Output(display_name="subject_masks",
                                    tooltip="The exact subject silhouette of each photo, for SuTI Demonstrations.")],
        )

    @classmethod
    def execute(cls, subject_id: int, num_demos: int, seed: int) -> io.NodeOutput:
        subject = subject_from_id(subject_id)
        demos = render_demos(subject, num_demos, seed)
        pixels = torch.from_numpy(demos.images).float() / 255.0                # (B, H, W, 3) in [0, 1]
        return io.NodeOutput(pixels, "\n".join(demos.captions), subject.shape, subject_split(subject_id),
                             torch.from_numpy(demos.masks).float())


class SuTIToyPoseMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SuTIToyPoseMap",
            display_name="SuTI Toy Pose Map",
            category="SuTI/toy world",
            description="Draw the silhouette map the toy pose ControlNet (suti_toy_pose_controlnet) was trained on: "
            "white where the subject goes, black elsewhere. Feed it to the stock Apply ControlNet node; the prompt "
            "then needs no position or size words.",
            inputs=[
                io.Combo.Input("shape", options=list(SHAPES), default="dog", tooltip="The silhouette's outline."),
                io.Combo.Input("position", options=list(POSITIONS), default="center", tooltip="Where the subject stands."),
                io.Combo.Input("scale", options=list(SCALES), default="large", tooltip="How big the subject is."),
                io.Combo.Input("state", options=list(STATES), default="upright", tooltip="Upright or upside down."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, step=1,
                             tooltip="The same few-percent jitter of place and size the world's renders have."),
            ],
            outputs=[io.Image.Output(display_name="pose_map")],
        )

    @classmethod
    def execute(cls, shape: str, position: str, scale: str, state: str, seed: int) -> io.NodeOutput:
        hint = pose_map(first_subject_of_shape(shape), Context(position=position, scale=scale, state=state), seed=seed)
        return io.NodeOutput(torch.from_numpy(hint)[None])  # (1, H, W, 3) in [0, 1]
