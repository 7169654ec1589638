"""Shared checks for the training.data stage tests: a folder's bytes, a stage killed mid-shard, a tiny open_clip,
the experts stage's samples in two shards."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from training.shards import add_sample, encode_images, read_members, sample_locations, whole_shard

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def folder_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path: equal dicts mean byte-identical stage outputs."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_killed(monkeypatch: pytest.MonkeyPatch, stage: ModuleType, at_sample: int, run: Callable[[], object]) -> None:
    """Run a stage that dies (KeyboardInterrupt) while writing its `at_sample`-th output sample, as a kill would."""
    calls, add_sample = [], stage.add_sample

    def dies(*args):
        calls.append(1)
        if len(calls) == at_sample:
            raise KeyboardInterrupt("killed mid-shard")
        add_sample(*args)

    monkeypatch.setattr(stage, "add_sample", dies)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()


def write_tiny_clip(folder: Path) -> Path:
    """open_clip's local layout (what `huggingface-cli download` of an open_clip repo gives) with random weights
    (seed 0) under `folder`: a model clip-filter loads through its own path, never downloaded."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def expert_sample(cluster: str, skill: str, demos: np.ndarray, prompt: str, render: np.ndarray) -> dict[str, bytes]:
    """A sample as the experts stage writes it (training/data/experts.py; its class word left out)."""
    full = np.ones(render.shape[:2], dtype=bool)
    meta = {"cluster": cluster, "identifier": "sks", "skill": skill,
            "source": "template", "target_caption": prompt, "expert_prompt": prompt, "demo_keys": [],
            "demo_captions": ["a demo"] * len(demos), "expert": f"experts/{cluster}.safetensors"}
    return {"json": json.dumps(meta).encode()} | encode_images(demos, [full] * len(demos), render, full)


def folder_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of `directory`'s shards by key: its members' bytes."""
    return {loc.key: read_members(loc) for shard in sorted(directory.glob("*.tar")) for loc in sample_locations(shard)}


def write_two_shards(folder: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """(key, members) samples as `folder`'s shard-000000.tar (the first half) and shard-000001.tar."""
    half = len(samples) // 2
    for name, part in (("shard-000000.tar", samples[:half]), ("shard-000001.tar", samples[half:])):
        with whole_shard(folder / name) as tar:
            for key, members in part:
                add_sample(tar, key, members)
    return folder
