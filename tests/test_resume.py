"""trainlib/resume.py: a checkpoint's train loader state (its own, or one made from an older checkpoint's fields),
the flags that cannot continue a checkpoint, refused in words; the LR schedule's position ends the run with the
schedule."""
from __future__ import annotations

import pytest

from pipeline import build_loader
from pipeline.plan import Position, Stage
from trainlib.checkpoint import CheckpointError
from trainlib.config import TrainConfig
from trainlib.resume import CHECKPOINT_FORMAT, check_position, loader_state, schedule_position


def old_state(epoch=0, step=2, world=1, batch=8, steps_per_epoch=6, samples=48, stages=(), capped=0, repeats=0,
              accum=1, seed=0) -> dict:
    """A format-1 checkpoint's fields (no loader state): epoch `epoch`, `step` steps into it, on world x batch."""
    return {"epoch": epoch, "step_in_epoch": step, "global_step": epoch * steps_per_epoch + step,
            "world_size": world, "batch_size": batch, "steps_per_epoch": steps_per_epoch, "train_samples": samples,
            "epoch_stages": [[s.world_size, s.batch_size, s.steps_done] for s in stages],
            "grad_accum_steps": accum, "config": {"batch_size": batch, "steps_per_epoch": capped,
                                                  "aug_repeats": repeats, "seed": seed}}


def synthetic(world=1, batch=8, samples=48, **kw):
    """A synthetic train loader whose epoch has `samples` samples (what an older checkpoint's sample count is)."""
    loader = build_loader(backend="synthetic", batch_size=batch, device="cpu", world_size=world, img_size=8, **kw)
    loader.num_samples = samples
    return loader


def test_an_older_checkpoint_resumes_where_it_stood():
    earlier = (Stage(2, 4, 3),)
    loader = synthetic()
    loader.load_state_dict(loader_state(old_state(step=2, stages=earlier), TrainConfig(epochs=2, batch_size=8),
                                        loader, 6))
    assert loader.position == Position(0, earlier, 3 + 2)  # its own layout: exactly at its step, counted on
    elastic = synthetic(world=2, batch=4)
    elastic.load_state_dict(loader_state(old_state(step=2, accum=2), TrainConfig(epochs=2, batch_size=4), elastic, 6))
    assert elastic.position == Position(0, (Stage(1, 8, 4),), 4)  # 2 steps of 2 micro-batches: 4 batches read
    assert len(elastic) == 4 + 2  # and 48 - 32 samples left, in batches of 4 on 2 ranks


def test_a_new_checkpoint_holds_its_loaders_own_state():
    loader = synthetic()
    loader.set_epoch(1)
    assert loader_state({"format": CHECKPOINT_FORMAT, "loader": loader.state_dict()}, TrainConfig(), loader,
                        6) == loader.state_dict()


@pytest.mark.parametrize("ckpt, cfg, world, message", [
    (old_state(epoch=1, step=3), TrainConfig(epochs=1, batch_size=8), 1, "give at least --epochs 2"),
    (old_state(capped=6), TrainConfig(epochs=2, batch_size=4), 2, "--steps-per-epoch caps epochs"),
    ({**old_state(), "format": CHECKPOINT_FORMAT + 1}, TrainConfig(epochs=2), 1, "written by a newer version"),
])
def test_flags_that_cannot_continue_are_refused_in_words(ckpt, cfg, world, message):
    with pytest.raises(CheckpointError, match=message):
        check_position(ckpt, cfg, world)


def test_an_older_checkpoint_without_its_data_resumes_only_on_its_own_layout():
    loader = synthetic(world=2, batch=4)
    with pytest.raises(CheckpointError, match="does not record its data .* resumes only on its own layout"):
        loader_state(old_state(samples=None), TrainConfig(epochs=2, batch_size=4), loader, 6)
    own = synthetic()
    with pytest.raises(CheckpointError, match="trained on 6 steps per epoch, this one has 5"):
        loader_state(old_state(samples=None), TrainConfig(epochs=2, batch_size=8), own, 5)
    own.load_state_dict(loader_state(old_state(samples=None), TrainConfig(epochs=2, batch_size=8), own, 6))
    assert own.position == Position(0, (), 2)


def test_the_schedule_position_ends_the_run_with_the_schedule():
    cfg = TrainConfig(epochs=2)
    # 2 epochs of 12 steps; the rest of epoch 0 has 4 steps: 4 + 12 steps left of 24, so the schedule stands at 8.
    assert schedule_position(cfg, 12, epoch=0, step_in_epoch=0, epoch_steps=4) == 8
    assert schedule_position(cfg, 12, epoch=1, step_in_epoch=5, epoch_steps=12) == 17  # a whole epoch: its own step
