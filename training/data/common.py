"""What every data stage shares: finding input shards (img2dataset's or ours), order-keeping parallel work (local
processes, or Ray tasks with `--ray`), atomic JSON(L) files, the guard that lets a rerun resume only a run with the
same settings, and the in → kept → dropped summary. A stage's parallel work goes through `run_tasks` alone."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from PIL import Image, ImageOps
from tqdm import tqdm

from ..shards import add_sample, partial_path, read_members, sample_locations, whole_shard

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SETTINGS_FILE = "settings.json"
INDEX_DIR = "index"  # per-input-shard rows, so a rerun skips the shards they cover
# What `--overwrite` clears from a stage's --out: only what the stages write there.
OUTPUT_GLOBS = ("*.tar", "*.tar.partial", "*.jsonl", "*.jsonl.partial", "*.json", "*.json.partial",
                "index/*.jsonl", "index/*.partial", "experts/*")


def input_shards(directory: Path) -> list[Path]:
    """Every `*.tar` of `directory` in name order: img2dataset names its shards `00000.tar`, our stages
    `shard-000000.tar`; `.partial` files (unfinished shards) are not inputs."""
    paths = sorted(directory.glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no *.tar shards in {directory}; point --in at img2dataset's output folder, or make "
                                f"a synthetic crawl: python -m training.data synth-crawl --out {directory} --pages 200")
    return paths


RAY_INSTALL = 'pip install "ray>=2.9" (or the pack\'s extra: pip install -e ".[ray]")'
RAY_MAX_RETRIES = 3  # a task lost with its worker or node is rerun by Ray (a whole shard is skipped, a .partial redone)


@dataclass(frozen=True)
class Backend:
    """Where a stage's tasks run: `workers` local processes (1: this one), or with `ray` as Ray tasks, on the cluster
    at `address` or else on a local Ray of `workers` CPUs (a Ray this process already joined is used as it is)."""

    workers: int = 1
    ray: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if self.ray:
            import_ray()  # a missing Ray fails here, before any work

    @property
    def in_process(self) -> bool:
        return not self.ray and self.workers <= 1


def as_backend(workers: int | Backend) -> Backend:
    """A stage's `workers` argument as a Backend: a plain count means local processes."""
    return workers if isinstance(workers, Backend) else Backend(workers)


def import_ray() -> ModuleType:
    """Ray, an optional dependency (the `ray` extra), or an error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ModuleNotFoundError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}; or leave --ray and "
                                  "--ray-address out to run in local processes") from None
    return ray


def join_ray(backend: Backend) -> ModuleType:
    """Ray, joined: the Ray this process already joined, else the cluster at `backend.address` (sent this checkout's
    packages; its nodes bring the dependencies: torch, open_clip, ...; `auto`: the Ray `ray start` began on this
    machine), else a new local Ray of `backend.workers` CPUs, never a Ray some other process runs here."""
    ray = import_ray()
    if not ray.is_initialized():
        packages = [str(Path(__file__).parents[1]), str(Path(__file__).parents[2] / "suti_core")]
        ray.init(address=backend.address or "local", num_cpus=None if backend.address else backend.workers,
                 include_dashboard=False, runtime_env={"py_modules": packages} if backend.address else None)
    return ray


def run_tasks(function: Callable[[T], R], tasks: Sequence[T], workers: int | Backend, desc: str,
              gpus_per_task: float = 0) -> list[R]:
    """`function` over `tasks` in `workers` local processes (1: in this one) or as Ray tasks that each hold
    `gpus_per_task` GPUs (ignored locally), with a progress bar; results come in task order whatever the backend,
    so a stage's output never depends on it."""
    backend = as_backend(workers)
    bar = tqdm(total=len(tasks), desc=desc, unit="shard", mininterval=5)
    results: list[R] = []
    if backend.ray:
        results = _ray_map(function, tasks, backend, gpus_per_task, bar)
    elif backend.workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(function(task))
            bar.update()
    else:
        with multiprocessing.Pool(min(backend.workers, len(tasks))) as pool:
            for result in pool.imap(function, tasks):
                results.append(result)
                bar.update()
    bar.close()
    return results


def _apply(function: Callable[[T], R], task: T) -> R:
    return function(task)


def _ray_map(function: Callable[[T], R], tasks: Sequence[T], backend: Backend, gpus_per_task: float,
             bar: tqdm) -> list[R]:
    """One Ray task per task (1 CPU, `gpus_per_task` GPUs; Ray reruns lost ones), results in task order. A task that
    raises stops the stage with its own exception, as the local pool does."""
    ray = join_ray(backend)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < gpus_per_task and backend.address is None:  # a cluster may scale up; this machine will not
        raise ValueError(f"{bar.desc}: each Ray task needs {gpus_per_task} GPU(s) but this machine's Ray has {gpus:g}; "
                         "run it on a machine with a GPU, on a Ray cluster with --ray-address, or without --ray")
    remote = ray.remote(_apply).options(num_cpus=1, num_gpus=gpus_per_task, max_retries=RAY_MAX_RETRIES)
    shared = ray.put(function)
    refs = [remote.remote(shared, task) for task in tasks]
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # a failed task stops the stage now, not after the others
            bar.update()
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        for ref in pending:
            ray.cancel(ref)
        raise error.cause from error


def write_atomic(path: Path, text: str) -> None:
    """Write `text` under `path`'s `.partial` name, then rename: a kill never leaves a half file at `path`."""
    partial_path(path).write_text(text)
    os.replace(partial_path(path), path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object a line, keys in the order given, written atomically."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def indexed_rows(out: Path, shard: Path, make: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One input shard's rows from `out/index/<shard>.jsonl` when a previous run saved them, else `make()`'s, then
    saved: a rerun never redoes a shard's costly part (scoring, captioning, packing)."""
    saved = out / INDEX_DIR / f"{shard.name}.jsonl"
    if saved.exists():
        return read_jsonl(saved)
    rows = make()
    write_jsonl(saved, rows)
    return rows


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


def load_settings_file(kind: type[S], config: Path | None, overrides: dict[str, Any]) -> S:
    """A stage's settings dataclass: defaults, then the config file's values (TOML or JSON, the field names as keys),
    then the flags given (None: not given)."""
    names = [f.name for f in fields(kind)]
    values: dict[str, Any] = {}
    if config is not None:
        if not config.is_file():
            raise FileNotFoundError(f"no config file {config}; write one with some of {', '.join(names)} as keys "
                                    f"(e.g. `{names[0]} = {getattr(kind(), names[0])}`), or leave --config out for "
                                    "the defaults")
        values = _read_toml(config) if config.suffix == ".toml" else json.loads(config.read_text())
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{config}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
    values |= {name: value for name, value in overrides.items() if value is not None}
    return replace(kind(), **values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        raise ValueError(f"reading {path} needs Python 3.11+ (tomllib); write the settings as JSON instead") from None
    return tomllib.loads(path.read_text())


def image_member(members: dict[str, bytes], i: int) -> str:
    """The member name of a cluster sample's i-th image: `img{i}.jpg` (or .png, ...)."""
    return next(f"img{i}.{e}" for e in IMAGE_EXTENSIONS if f"img{i}.{e}" in members)


def decode_image(data: bytes) -> Image.Image | None:
    """The image as RGB, or None when Pillow cannot decode the bytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def square_image(image: Image.Image, size: int) -> Image.Image:
    """The image's centred square, resized to `size` px (bicubic): what the networks and the trainer read."""
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)


def kept_clusters(shard: Path, rows: Sequence[dict[str, Any]], entry: Callable[[dict[str, Any], dict[str, Any]],
                  dict[str, Any]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of each cluster sample of `shard` with a kept image in `rows` (per image: `cluster`, `index`,
    `kept`), holding only its kept images, renumbered img0.. with their bytes as they are; each json entry is
    `entry(old entry, row)`. What the per-image stages (clip-filter, recaption) write."""
    for location in sample_locations(shard):
        kept = [row for row in rows if row["cluster"] == location.key and row["kept"]]
        if not kept:
            continue
        members = read_members(location)
        meta, images, files = json.loads(members["json"]), [], {}
        for row in kept:
            member = image_member(members, row["index"])
            files[f"img{len(images)}.{member.partition('.')[2]}"] = members[member]
            images.append(entry(meta["images"][row["index"]], row))
        yield location.key, {"json": json.dumps({**meta, "images": images}).encode(), **files}


def write_kept(shard: Path, out: Path, rows: Sequence[dict[str, Any]],
               entry: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]) -> None:
    """Write `shard`'s kept images (kept_clusters) to the shard of its name in `out`, unless that one is whole."""
    target = out / shard.name
    if any(row["kept"] for row in rows) and not target.exists():
        with whole_shard(target) as tar:
            for key, members in kept_clusters(shard, rows, entry):
                add_sample(tar, key, members)


def cluster_note(rows: Sequence[dict[str, Any]]) -> str:
    """`12 in → 9 kept`: the clusters the rows came from and those with a kept row."""
    return f"{len({r['cluster'] for r in rows if r['cluster']})} in → {len({r['cluster'] for r in rows if r['kept']})} kept"


def finish_stage(out: Path, summary: StageSummary, rows: Sequence[dict[str, Any]]) -> StageSummary:
    """Count every row's fate into `summary`, then write `manifest.jsonl` (the rows, less the per-shard `index`)
    and `summary.json`: the last thing a stage does."""
    for row in rows:
        summary.count(row["reason"])
    write_jsonl(out / "manifest.jsonl", [{k: v for k, v in row.items() if k != "index"} for row in rows])
    write_atomic(out / "summary.json", json.dumps(summary.as_dict(), indent=1) + "\n")
    return summary


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
