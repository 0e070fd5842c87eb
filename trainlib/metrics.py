"""Throughput and input-wait bookkeeping for the training loop, honest about asynchronous devices.

Device work is queued asynchronously, so wall time read on the host means something only right after a
synchronize. `Throughput` therefore synchronizes at log boundaries only (and where the warm-up window ends), never
per step; a step is counted once its compute is queued, so every interval's figure covers the compute of every step
it counts. Between two boundaries it sums the wall time the training thread spent blocked in `next(loader)`:
divided by the interval's wall time that is the input-wait share. It is an upper bound on the time the device idled
for input, since device work queued earlier may still run while the host waits.
"""
from __future__ import annotations

import time
from typing import Callable


class Throughput:
    """Global img/s over the last log interval and since warm-up, plus the input-wait share of each.

    `global_batch` is images per step over all ranks: every rank runs the same steps, so rank 0's clock times the
    whole job. The first `warmup_steps` steps this process runs (compilation, allocator and pipeline start-up) are
    left out of the running mean, and `pause()`..`start()` keeps evaluation out of it. `clock` is injectable for tests.
    """

    def __init__(self, device, global_batch: int, warmup_steps: int, clock: Callable[[], float] = time.perf_counter):
        self.device, self.global_batch, self.warmup_steps, self.clock = device, global_batch, warmup_steps, clock
        self.steps_run = 0  # by this process, for the warm-up window
        self.mean_steps, self.mean_time, self.mean_wait = 0, 0.0, 0.0
        self.all_steps, self.all_time = 0, 0.0  # every timed step, warm-up included: a short run's only figure
        self.last = {"img_s": 0.0, "input_wait": 0.0, "img_s_mean": None, "input_wait_mean": None}
        self.start()

    def start(self) -> None:
        self.device.synchronize()  # sync: the interval starts with no earlier work still queued
        self.t_last, self.interval_steps, self.interval_wait = self.clock(), 0, 0.0

    def step(self, input_wait_s: float) -> None:
        """One step done: call it after the step's compute is queued, with the time spent waiting for its batch."""
        self.steps_run += 1
        self.interval_steps += 1
        self.interval_wait += input_wait_s
        if self.steps_run == self.warmup_steps:
            self.lap(count=False)  # sync: the mean starts exactly where warm-up ends

    def lap(self, count: bool = True) -> dict:
        """Close the interval (synchronizes) and return its figures; count it into the mean unless in warm-up."""
        if not self.interval_steps:
            return self.last  # nothing ran since the previous lap (e.g. warm-up ended on a log step)
        self.device.synchronize()  # sync: all the interval's steps have finished on the device
        now = self.clock()
        elapsed = max(now - self.t_last, 1e-9)
        steps, wait = self.interval_steps, self.interval_wait
        self.all_steps, self.all_time = self.all_steps + steps, self.all_time + elapsed
        if count and self.steps_run > self.warmup_steps:
            self.mean_steps, self.mean_time, self.mean_wait = (self.mean_steps + steps, self.mean_time + elapsed,
                                                               self.mean_wait + wait)
        self.t_last, self.interval_steps, self.interval_wait = now, 0, 0.0
        self.last = {"img_s": steps * self.global_batch / elapsed, "input_wait": wait / elapsed,
                     "img_s_mean": self.mean_img_s(), "input_wait_mean": self.mean_input_wait()}
        return self.last

    def pause(self) -> None:
        """Close the running interval before something that must not count (evaluation, checkpoint writing)."""
        if self.interval_steps:
            self.lap()

    def mean_img_s(self) -> float | None:
        return self.mean_steps * self.global_batch / self.mean_time if self.mean_time else None

    def mean_input_wait(self) -> float | None:
        return self.mean_wait / self.mean_time if self.mean_time else None

    def all_img_s(self) -> float | None:
        """Over every timed step, warm-up included: the figure of a run too short to leave its warm-up."""
        return self.all_steps * self.global_batch / self.all_time if self.all_time else None
