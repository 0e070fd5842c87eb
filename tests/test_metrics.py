"""trainlib/metrics.py: every printed img/s covers the compute of every step it counts, checked against a synthetic
clock; a run inside its warm-up still has a figure."""
from __future__ import annotations

import pytest

from trainlib.devices import Device
from trainlib.metrics import Throughput


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def run(steps: int, warmup: int, log_every: int, batch: int = 8):
    """The engine's order per step: wait for the batch, run the step, count it, log every `log_every` steps. Step k
    waits k ms and computes 10*(k+1) ms, so every interval has its own true rate."""
    clock = Clock()
    meter = Throughput(Device("cpu"), batch, warmup, clock=clock)
    laps, spans, span = [], [], [0, 0.0]
    for k in range(steps):
        wait, compute = k / 1000, (k + 1) / 100
        clock.t += wait + compute
        meter.step(wait)
        span = [span[0] + 1, span[1] + wait + compute]
        if meter.steps_run == warmup:  # the meter closed the warm-up interval by itself
            spans.append(("warm-up", *span))
            span = [0, 0.0]
        if (k + 1) % log_every == 0:
            laps.append(meter.lap())
            if span[0]:
                spans.append(("warm-up" if meter.steps_run <= warmup else "interval", *span))
                span = [0, 0.0]
    return meter, laps, spans


@pytest.mark.parametrize("warmup,log_every", [(3, 1), (3, 2), (4, 4), (5, 3)])
def test_every_interval_counts_the_compute_of_its_steps(warmup, log_every):
    meter, laps, spans = run(steps=12, warmup=warmup, log_every=log_every)
    intervals = [s for s in spans if s[0] == "interval"]
    # Each lap that closed a real interval reports exactly its steps over its time.
    reported = [lap["img_s"] for lap in laps]
    for _, n, seconds in intervals:
        assert n * 8 / seconds in [pytest.approx(r) for r in reported]
    after = sum(n for _, n, _ in intervals)
    assert after == 12 - warmup
    assert meter.mean_img_s() == pytest.approx(after * 8 / sum(s for _, _, s in intervals))
    assert meter.all_img_s() == pytest.approx(12 * 8 / sum(s for _, _, s in spans))
    # No figure may exceed the fastest true step rate (step 0: 8 images in 10 ms).
    assert max(reported) <= 800 + 1e-6


def test_a_run_inside_its_warm_up_has_an_all_steps_figure():
    meter, laps, _ = run(steps=4, warmup=10, log_every=2)
    assert meter.mean_img_s() is None
    assert meter.all_img_s() == pytest.approx(4 * 8 / sum(k / 1000 + (k + 1) / 100 for k in range(4)))
