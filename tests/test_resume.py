"""trainlib/resume.py: a checkpoint resumes exactly on its own layout, elastically on another one with the rest of
its epoch, and refuses, in words, what it cannot continue; the LR schedule's position ends the run with the schedule."""
from __future__ import annotations

import pytest

from pipeline.plan import Stage
from trainlib.checkpoint import CheckpointError
from trainlib.config import TrainConfig
from trainlib.resume import ResumePoint, resume_point, schedule_position


def state(epoch=0, step=2, world=1, batch=8, steps_per_epoch=6, samples=48, stages=(), capped=0, repeats=0,
          accum=1) -> dict:
    """The fields of a checkpoint that resume_point reads: epoch `epoch`, `step` steps into it, on world x batch."""
    return {"epoch": epoch, "step_in_epoch": step, "global_step": epoch * steps_per_epoch + step,
            "world_size": world, "batch_size": batch, "steps_per_epoch": steps_per_epoch, "train_samples": samples,
            "epoch_stages": [[s.world_size, s.batch_size, s.steps_done] for s in stages],
            "grad_accum_steps": accum, "config": {"batch_size": batch, "steps_per_epoch": capped,
                                                  "aug_repeats": repeats}}


def test_the_same_layout_resumes_exactly_at_its_step():
    earlier = (Stage(2, 4, 3),)
    point = resume_point(state(step=2, stages=earlier), TrainConfig(epochs=2, batch_size=8), 1, 6, 48)
    assert point == ResumePoint(2, earlier, exact=True)


def test_another_layout_goes_on_with_the_rest_of_the_epoch():
    point = resume_point(state(step=2), TrainConfig(epochs=2, batch_size=4), 2, 6, 48)
    assert point == ResumePoint(0, (Stage(1, 8, 2),), exact=False)
    # At an epoch boundary nothing of the epoch ran yet: a whole epoch on the new layout.
    assert resume_point(state(epoch=1, step=0), TrainConfig(epochs=2, batch_size=4), 2, 6, 48) == \
        ResumePoint(0, (), exact=False)


def test_repeated_augmentation_resumes_only_as_its_epoch_was_read():
    exact = resume_point(state(repeats=3), TrainConfig(epochs=2, batch_size=8, aug_repeats=3), 1, 6, 48)
    assert exact == ResumePoint(2, (), exact=True)
    refused = [(state(repeats=3), TrainConfig(epochs=2, batch_size=8), 1),  # repeats dropped mid-epoch
               (state(), TrainConfig(epochs=2, batch_size=8, aug_repeats=3), 1),  # turned on mid-epoch
               (state(repeats=3), TrainConfig(epochs=2, batch_size=4, aug_repeats=3), 2),  # another layout
               (state(repeats=3, stages=(Stage(2, 4, 1),)), TrainConfig(epochs=2, batch_size=8, aug_repeats=3), 1)]
    for ckpt, cfg, world in refused:
        with pytest.raises(CheckpointError, match="--aug-repeats .* resumes only as it was read"):
            resume_point(ckpt, cfg, world, 6, 48)
    # At an epoch's end any of them goes on.
    boundary = resume_point(state(epoch=1, step=0, repeats=3), TrainConfig(epochs=2, batch_size=4), 2, 6, 48)
    assert boundary == ResumePoint(0, (), exact=False)


def test_another_number_of_micro_batches_is_an_elastic_resume_counted_in_batches():
    point = resume_point(state(step=2, accum=2), TrainConfig(epochs=2, batch_size=8, grad_accum_steps=1), 1, 6, 48)
    assert point == ResumePoint(0, (Stage(1, 8, 4),), exact=False)  # 2 steps of 2 micro-batches: 4 batches read


@pytest.mark.parametrize("ckpt, cfg, world, steps, samples, message", [
    (state(epoch=1, step=3), TrainConfig(epochs=1, batch_size=8), 1, 6, 48, "give at least --epochs 2"),
    (state(), TrainConfig(epochs=2, batch_size=8), 1, 6, 47, "trained on 48 samples, this one has 47"),
    (state(samples=None), TrainConfig(epochs=2, batch_size=4), 2, 6, None, "resumes only on its own layout"),
    (state(capped=6), TrainConfig(epochs=2, batch_size=4), 2, 6, 48, "--steps-per-epoch caps epochs"),
])
def test_what_cannot_continue_is_refused_in_words(ckpt, cfg, world, steps, samples, message):
    with pytest.raises(CheckpointError, match=message):
        resume_point(ckpt, cfg, world, steps, samples)


def test_the_schedule_position_ends_the_run_with_the_schedule():
    cfg = TrainConfig(epochs=2)
    # 2 epochs of 12 steps; the rest of epoch 0 has 4 steps: 4 + 12 steps left of 24, so the schedule stands at 8.
    assert schedule_position(cfg, 12, epoch=0, step_in_epoch=0, epoch_steps=4) == 8
    assert schedule_position(cfg, 12, epoch=1, step_in_epoch=5, epoch_steps=12) == 17  # a whole epoch: its own step
