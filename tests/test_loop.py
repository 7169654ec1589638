"""training.loop.optimise: the step loop's stop rule, which several processes must share."""
from __future__ import annotations

import torch

from training.loop import optimise


def _run(minutes: float, agree=None) -> tuple[int, list[int]]:
    weight = torch.nn.Parameter(torch.ones(()))
    saved: list[int] = []
    reached = optimise(lambda: weight**2, torch.optim.SGD([weight], lr=0.1), 0, 5, minutes, saved.append, "t",
                       agree=agree)
    return reached, saved


def test_stops_at_the_step_count_and_saves_it():
    assert _run(minutes=10) == (5, [5])


def test_every_process_stops_when_any_clock_runs_out():
    """`agree` carries the processes' decision: a peer out of time stops this process too, and while no process
    is out of time this one goes on even past its own budget (so none waits alone in an all-reduce)."""
    peer_out_after = iter([False, False, True])
    assert _run(minutes=10, agree=lambda mine: mine or next(peer_out_after)) == (2, [2])
    seen: list[bool] = []
    assert _run(minutes=0, agree=lambda mine: seen.append(mine) or False) == (5, [5])
    assert seen and all(seen), "this process's own clock (out of time at once) is what it offers to agree on"
