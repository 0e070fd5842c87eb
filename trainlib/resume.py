"""Where a checkpoint's run continues in this run's layout (world size x batch size): the same layout exactly at its
step; another one (an elastic resume) with the samples of the interrupted epoch that no layout has read yet
(pipeline/plan.py rule 6). And the step of this run's LR schedule that position stands at; and whether the
checkpoint was trained on the shard set this run reads (`check_data`)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.plan import Stage
from trainlib import checkpoint
from trainlib.config import TrainConfig


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint's run continues in this run's layout (world size x batch size)."""

    step_in_epoch: int  # steps of this layout already done in the checkpoint's epoch
    stages: tuple[Stage, ...] = ()  # layouts that ran part of that epoch before this one (pipeline/plan.py rule 6)
    exact: bool = True  # the checkpoint's layout: the same batches and random streams as an uninterrupted run
    other_data: bool = False  # another shard set (--resume-other-data): weights and optimizer state, from epoch 0

def resume_point(state: dict, cfg: TrainConfig, world_size: int, steps_per_epoch: int,
                 train_samples: int | None) -> ResumePoint:
    """How `state` continues here, or CheckpointError. The same layout resumes exactly, at its step. Another world
    size or batch size (an elastic resume) continues the interrupted epoch with the samples no layout has read yet
    (pipeline/plan.py rule 6); the data must be the same. --epochs may grow, not drop below the position."""
    needed = state["epoch"] + (state["step_in_epoch"] > 0)
    if cfg.epochs < needed:
        raise checkpoint.CheckpointError(
            f"--epochs {cfg.epochs} ends before the checkpoint's position (epoch {state['epoch']}, step "
            f"{state['step_in_epoch']}, global step {state['global_step']}); give at least --epochs {needed}")
    stages = tuple(Stage(*s) for s in state.get("epoch_stages", ()))
    # The layout: batch size, ranks and micro-batches per optimizer step (older checkpoints: 1).
    accum = state.get("grad_accum_steps", 1)
    layout = state.get("batch_size", state["config"]["batch_size"]), state["world_size"], accum
    recorded = state.get("train_samples")  # None in checkpoints older than elastic resume, and without shards
    same_data = recorded == train_samples if recorded is not None else state["steps_per_epoch"] == steps_per_epoch
    same_layout = (layout == (cfg.batch_size, world_size, cfg.grad_accum_steps) and same_data and
                   state["steps_per_epoch"] == steps_per_epoch)
    # Rule 7 (pipeline/plan.py) has no rest-of-epoch: an epoch with repeats resumes only exactly as it was read.
    repeats = max(1, state["config"].get("aug_repeats", 0)), max(1, cfg.aug_repeats)
    if state["step_in_epoch"] and max(repeats) > 1 and (repeats[0] != repeats[1] or stages or not same_layout):
        raise checkpoint.CheckpointError(
            f"--aug-repeats {cfg.aug_repeats}: the checkpoint stopped inside an epoch read with --aug-repeats "
            f"{state['config'].get('aug_repeats', 0)} on {layout[1]} x {layout[0]} x {accum} (ranks x batch x "
            f"micro-batches){' after an elastic resume' if stages else ''}; such an epoch resumes only as it was "
            f"read: resume with its --aug-repeats and layout, or from a checkpoint at an epoch's end")
    if same_layout:
        return ResumePoint(state["step_in_epoch"], stages)
    if not same_data:
        raise checkpoint.CheckpointError(
            f"the checkpoint's run trained on {recorded or state['steps_per_epoch']} "
            f"{'samples' if recorded else 'steps per epoch'}, this one has {train_samples or steps_per_epoch}: "
            f"resume on the same data, or start a new run from its weights with --pretrained")
    if recorded is None:
        raise checkpoint.CheckpointError(
            f"the checkpoint's run was {layout[1]} x {layout[0]} x {accum} (ranks x batch x micro-batches), this "
            f"one {world_size} x {cfg.batch_size} x {cfg.grad_accum_steps}, and the checkpoint does not record its "
            f"data (synthetic input, or an older "
            f"checkpoint): it resumes only on its own layout")
    if cfg.steps_per_epoch or state["config"].get("steps_per_epoch"):
        raise checkpoint.CheckpointError(
            "--steps-per-epoch caps epochs for performance runs; such a run resumes only on its own world size "
            "and batch size")
    if state["step_in_epoch"]:  # the epoch goes on with the samples the layouts before did not read
        stages += (Stage(state["world_size"], layout[0], state["step_in_epoch"] * accum),)
    return ResumePoint(0, stages, exact=False)


def schedule_position(cfg: TrainConfig, steps_per_epoch: int, epoch: int, step_in_epoch: int,
                      epoch_steps: int) -> int:
    """The global step from which the steps this run has left end it with its LR schedule (built over --epochs x
    `steps_per_epoch`), at step `step_in_epoch` of an epoch `epoch` of `epoch_steps` steps."""
    steps_left = epoch_steps - step_in_epoch + (cfg.epochs - epoch - 1) * steps_per_epoch
    return cfg.epochs * steps_per_epoch - steps_left


def check_data(state: dict, here: dict | None, cfg: TrainConfig, path) -> tuple[bool, str | None]:
    """(whether `state` goes on with another shard set than `here`, this run's `trainlib.build.data_identity`; a note
    to print). A training resume compares the class lists and the train shards (their sha256s, as the manifest
    lists them), an evaluation the class lists: another set is a CheckpointError naming both, unless
    --resume-other-data. A checkpoint that records no set (older, or of synthetic input) goes on with a note."""
    if here is None:  # synthetic input: no set to compare (resume_point compares what there is)
        return False, None
    there = state.get("data")
    if there is None:
        return False, (f"note: {path} records no shard set (written before checkpoints did, or on synthetic input): "
                       f"whether --data_path {cfg.data_path} is the data it was trained on could not be checked")
    differs = data_difference(there, here, classes_only=cfg.evaluate)
    if differs is None:
        return False, None
    trained_at = state.get("config", {}).get("data_path")
    what = (f"the checkpoint was trained on shard set {there['plan_id']} ({describe_set(there)}"
            f"{f', at {trained_at}' if trained_at else ''}); --data_path {cfg.data_path} is set {here['plan_id']} "
            f"({describe_set(here)}): {differs}")
    if not cfg.resume_other_data:
        raise checkpoint.CheckpointError(f"--resume {path}: {what}; pass --resume-other-data to "
                                         f"{'evaluate' if cfg.evaluate else 'fine-tune'} on it on purpose")
    if cfg.evaluate:
        return True, f"note: --resume-other-data: {what}"
    return True, (f"note: --resume-other-data: {what}; its weights and optimizer state start epoch 0 of this set, "
                  f"with a new LR schedule, best Acc@1 and random streams")


def data_difference(there: dict, here: dict, classes_only: bool = False) -> str | None:
    """What tells two shard sets' identities apart, in words; None when a resume may treat them as the same data."""
    a, b = there["classes"], here["classes"]
    if len(a) != len(b):
        return f"{len(a):,} classes there, {len(b):,} here"
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if differ:
        i = differ[0]
        return f"classes differ ({len(differ):,} of {len(a):,}; label {i} is {a[i]} there, {b[i]} here)"
    if classes_only or there["train_shards"] == here["train_shards"]:
        return None
    return "the same classes, other train shards (another source, shuffle or shard size)"


def describe_set(identity: dict) -> str:
    classes, samples = identity["classes"], identity["train_samples"]
    names = f" {classes[0]}..{classes[-1]}" if classes else ""
    return f"{len(classes):,} classes{names}, " + (f"{samples:,} train samples" if samples is not None else
                                                   "no train split")
