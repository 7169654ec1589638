"""Render training batches ahead in worker processes, so a GPU step does not wait on the CPU renderer.

Each trainer makes step k's batch from (seed, step k) alone, so a batch is the same whichever process makes it
and a resumed run draws what an unbroken one did with any number of workers. The workers are forked, so a batch
maker must not touch CUDA: it renders on the CPU and the trainer moves the batch to its device (a forked child of a
process that has initialised CUDA cannot use it).
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from itertools import count
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_make: Callable[[int], Any] | None = None  # a worker's batch maker, inherited when the pool forks


def _start_worker(make: Callable[[int], Any]) -> None:
    global _make
    _make = make
    torch.set_num_threads(1)


def _call(step: int) -> Any:
    return _make(step)


def prefetched(make: Callable[[int], T], start: int, workers: int = 0, ahead: int = 2) -> Iterator[T]:
    """make(start), make(start + 1), ... in order; with `workers` > 0 up to `workers * ahead` of them are made
    ahead in a pool of forked processes (each inherits `make`; only step numbers and batches are pickled)."""
    if workers <= 0:
        yield from map(make, count(start))
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(make,)) as pool:
        steps = count(start)
        pending = deque(pool.apply_async(_call, (next(steps),)) for _ in range(workers * ahead))
        while True:
            result = pending.popleft().get()
            pending.append(pool.apply_async(_call, (next(steps),)))
            yield result
