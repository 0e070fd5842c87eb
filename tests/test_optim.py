"""trainlib/optim.py: the warm-up meets the cosine at the peak LR, and a resume on a run of another length keeps the
checkpoint's moments while its LR follows this run's schedule from the given step."""
from __future__ import annotations

import pytest
import torch

from trainlib.config import TrainConfig
from trainlib.devices import Device
from trainlib.optim import OptimStep, build_optimizer, build_scheduler

CPU = Device("cpu")


def optim_step(cfg: TrainConfig, steps_per_epoch: int) -> OptimStep:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(cfg, model, CPU)
    return OptimStep(model=model, raw_model=model, optimizer=optimizer,
                     scheduler=build_scheduler(cfg, optimizer, steps_per_epoch), device=CPU, amp_dtype=torch.float32,
                     label_smoothing=cfg.label_smoothing, clip_grad=cfg.clip_grad)


def train(step: OptimStep, n: int) -> list[float]:
    """The LR each of `n` steps used."""
    lrs = []
    for _ in range(n):
        lrs.append(step.lr)
        step(torch.randn(2, 4), torch.tensor([0, 2]))
    return lrs


def test_the_warm_up_reaches_the_peak_where_the_cosine_takes_over():
    cfg = TrainConfig(epochs=2, lr=1e-2, warmup_steps=4, min_lr=1e-4)
    lrs = train(optim_step(cfg, steps_per_epoch=5), 10)
    assert lrs[:5] == pytest.approx([k / 5 * 1e-2 for k in range(1, 6)])  # the ramp ends on the peak
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # from there a strict descent


def test_a_schedule_recomputed_on_resume_is_this_runs_while_the_moments_are_the_checkpoints():
    short = optim_step(TrainConfig(epochs=2, lr=1e-2, warmup_steps=2), steps_per_epoch=3)
    train(short, 6)
    saved = short.state_dict()
    longer = TrainConfig(epochs=3, lr=1e-2, warmup_steps=2)
    resumed, fresh = optim_step(longer, steps_per_epoch=3), optim_step(longer, steps_per_epoch=3)
    resumed.load_state_dict(saved, schedule_at=6)
    moments = saved["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"], moments)
    recomputed = train(resumed, 3)
    assert recomputed == pytest.approx(train(fresh, 9)[6:])
    exact = optim_step(TrainConfig(epochs=2, lr=1e-2, warmup_steps=2), steps_per_epoch=3)
    exact.load_state_dict(saved)  # the checkpoint's own schedule, where it stopped: the end of its decay
    assert exact.lr == pytest.approx(short.lr) and exact.lr < recomputed[0]
