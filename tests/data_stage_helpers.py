"""Shared checks for the training.data stage tests: a folder's bytes, and a stage killed mid-shard."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


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
