"""The step loop the small trainers share: optimise, show progress, checkpoint every few minutes, resume by step."""
from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm import tqdm


def optimise(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, step: int, steps: int, minutes: float,
             save: Callable[[int], None], desc: str, save_every_s: float = 240,
             backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
             after_step: Callable[[int], None] | None = None,
             agree: Callable[[bool], bool] | None = None) -> int:
    """Run `opt` on `loss_fn()` from `step` until `steps` or `minutes` have passed; `save(step)` every
    `save_every_s` seconds and at the end. `backward` may replace `loss.backward()` (e.g. accelerate's);
    `after_step(step)` runs after each optimiser step (EMA, learning-rate schedule); `agree(out_of_time)` turns
    this process's clock into every process's decision, so all stop at the same step. Returns the step reached."""
    start = last_save = time.time()
    bar = tqdm(total=steps, initial=step, desc=desc, mininterval=10)
    while step < steps:
        out_of_time = time.time() - start >= minutes * 60
        if agree(out_of_time) if agree is not None else out_of_time:
            break
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        backward(loss)
        opt.step()
        step += 1
        if after_step is not None:
            after_step(step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if time.time() - last_save > save_every_s:
            save(step)
            last_save = time.time()
    bar.close()
    save(step)
    return step
