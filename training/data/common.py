"""What every data stage shares: finding input shards (img2dataset's or ours), an order-keeping process pool, atomic
JSON(L) files, the guard that lets a rerun resume only a run with the same settings, and the in → kept → dropped
summary. A stage's parallel work goes through `run_tasks` alone, so a Ray backend (issue 13) plugs in there."""
from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from ..shards import partial_path

T = TypeVar("T")
R = TypeVar("R")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SETTINGS_FILE = "settings.json"
# What `--overwrite` clears from a stage's --out: only what the stages write there.
OUTPUT_GLOBS = ("*.tar", "*.tar.partial", "*.jsonl", "*.jsonl.partial", "*.json", "*.json.partial",
                "index/*.jsonl", "index/*.partial")


def input_shards(directory: Path) -> list[Path]:
    """Every `*.tar` of `directory` in name order: img2dataset names its shards `00000.tar`, our stages
    `shard-000000.tar`; `.partial` files (unfinished shards) are not inputs."""
    paths = sorted(directory.glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no *.tar shards in {directory}; point --in at img2dataset's output folder, or make "
                                f"a synthetic crawl: python -m training.data synth-crawl --out {directory} --pages 200")
    return paths


def run_tasks(function: Callable[[T], R], tasks: Sequence[T], workers: int, desc: str) -> list[R]:
    """`function` over `tasks` in `workers` local processes (1: in this one), with a progress bar; results come in
    task order whatever the worker count, so a stage's output never depends on it."""
    bar = tqdm(total=len(tasks), desc=desc, unit="shard", mininterval=5)
    results: list[R] = []
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(function(task))
            bar.update()
    else:
        with multiprocessing.Pool(min(workers, len(tasks))) as pool:
            for result in pool.imap(function, tasks):
                results.append(result)
                bar.update()
    bar.close()
    return results


def write_atomic(path: Path, text: str) -> None:
    """Write `text` under `path`'s `.partial` name, then rename: a kill never leaves a half file at `path`."""
    partial_path(path).write_text(text)
    os.replace(partial_path(path), path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object a line, keys in the order given, written atomically."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def differing_settings(previous: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The setting names whose values differ between a run's recorded settings and a rerun's (sorted)."""
    return sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))


def claim_output(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Make `out` this run's folder. A rerun with the same settings (inputs included) resumes; with other settings
    it is refused, since its finished shards would mix two runs, unless `overwrite`, which clears the stage's files."""
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / SETTINGS_FILE
    if recorded.exists() and not overwrite:
        changed = differing_settings(json.loads(recorded.read_text()), settings)
        if changed:
            raise FileExistsError(f"{out} holds a run with other settings (differing: {', '.join(changed)}); rerun "
                                  "with the same ones to resume it, pass --overwrite to replace it, or choose another "
                                  "--out")
    if overwrite:
        for pattern in OUTPUT_GLOBS:
            for path in out.glob(pattern):
                path.unlink()
    write_atomic(recorded, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def shard_fingerprint(paths: Sequence[Path]) -> list[list[Any]]:
    """Input shards by name and size: a rerun over changed inputs must not resume from the old ones' outputs."""
    return [[path.name, path.stat().st_size] for path in paths]


@dataclass
class StageSummary:
    """How many samples came in, how many were kept, and why each other one was dropped."""

    stage: str
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: dict[str, Any] = field(default_factory=dict)

    def count(self, reason: str | None) -> None:
        self.total += 1
        if reason is None:
            self.kept += 1
        else:
            self.dropped[reason] += 1

    def line(self) -> str:
        """`cluster: 1000 in → 800 kept → 200 dropped (corrupt image 50, ...)`, reasons most frequent first."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items(), key=lambda x: (-x[1], x[0])))
        notes = "".join(f"; {k} {v}" for k, v in self.notes.items())
        return (f"{self.stage}: {self.total} in → {self.kept} kept → {self.total - self.kept} dropped"
                f"{f' ({reasons})' if reasons else ''}{notes}")

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "in": self.total, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                **self.notes}
