"""A procedural subject world with exact ground truth: subjects, contexts, renderer, captions, splits."""
from .subjects import Subject, subject_from_id, subject_split, subject_ids, NUM_SUBJECTS
from .context import Context, demo_contexts, sample_context
from .render import pose_map, render, render_mask
from .captions import caption_for, VOCABULARY
from .demos import DemoRenders, render_demos

__all__ = [
    "Subject", "subject_from_id", "subject_split", "subject_ids", "NUM_SUBJECTS",
    "Context", "demo_contexts", "sample_context", "render", "render_mask", "pose_map", "caption_for", "VOCABULARY",
    "DemoRenders", "render_demos",
]
