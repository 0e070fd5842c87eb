"""Where a checkpoint's run continues: the train loader's position it holds (the loader places it in this run's
layout, pipeline/loader.py `load_state_dict`; an older checkpoint's is made from its fields), the checks of the
flags against it, the step of this run's LR schedule that position stands at, and whether the checkpoint was
trained on the shard set this run reads (`check_data`)."""
from __future__ import annotations

from pipeline.loader import STATE_FORMAT
from trainlib import checkpoint
from trainlib.config import TrainConfig

# What train.py's checkpoints hold. 1: the position as epoch/step_in_epoch/epoch_stages fields (before the loader
# saved its own state); 2: the train loader's state_dict() under "loader". Both resume.
CHECKPOINT_FORMAT = 2


def check_position(state: dict, cfg: TrainConfig, world_size: int) -> None:
    """CheckpointError for flags that cannot continue `state`: --epochs may grow, not drop below its position; a
    --steps-per-epoch run (a performance run's capped epochs) resumes mid-epoch only on its own layout."""
    if state.get("format", 1) > CHECKPOINT_FORMAT:
        raise checkpoint.CheckpointError(
            f"the checkpoint is format {state['format']}, written by a newer version of train.py (this one reads up "
            f"to {CHECKPOINT_FORMAT}); resume it with that version")
    needed = state["epoch"] + (state["step_in_epoch"] > 0)
    if cfg.epochs < needed:
        raise checkpoint.CheckpointError(
            f"--epochs {cfg.epochs} ends before the checkpoint's position (epoch {state['epoch']}, step "
            f"{state['step_in_epoch']}, global step {state['global_step']}); give at least --epochs {needed}")
    layout = state.get("batch_size", state["config"]["batch_size"]), state["world_size"]
    capped = cfg.steps_per_epoch or state["config"].get("steps_per_epoch")
    if capped and state["step_in_epoch"] and layout != (cfg.batch_size, world_size):
        raise checkpoint.CheckpointError(
            "--steps-per-epoch caps epochs for performance runs; such a run resumes only on its own world size "
            "and batch size")


def loader_state(state: dict, cfg: TrainConfig, loader, steps_per_epoch: int) -> dict:
    """The train loader's state that `state` holds; for a format-1 checkpoint, made from its fields. A field that
    checkpoint did not record (its sample count and shards: older ones, synthetic input) is taken as this loader's:
    then it resumes only on its own layout and steps per epoch, as it did."""
    if state.get("format", 1) >= 2:
        return state["loader"]
    accum = state.get("grad_accum_steps", 1)
    layout = state.get("batch_size", state["config"]["batch_size"]), state["world_size"]
    samples = state.get("train_samples")
    if samples is None and (state["step_in_epoch"] or state.get("epoch_stages")):
        if layout != (cfg.batch_size, loader.spec.world_size) or accum != cfg.grad_accum_steps:
            raise checkpoint.CheckpointError(
                f"the checkpoint's run was {layout[1]} x {layout[0]} x {accum} (ranks x batch x micro-batches), "
                f"this one {loader.spec.world_size} x {cfg.batch_size} x {cfg.grad_accum_steps}, and the checkpoint "
                f"does not record its data (synthetic input, or an older checkpoint): it resumes only on its own "
                f"layout")
        if state["steps_per_epoch"] != steps_per_epoch:
            raise checkpoint.CheckpointError(
                f"the checkpoint's run trained on {state['steps_per_epoch']} steps per epoch, this one has "
                f"{steps_per_epoch}: resume on the same data, or start a new run from its weights with --pretrained")
    data, stages = state.get("data") or {}, state.get("epoch_stages", [])
    done = sum(stage[2] for stage in stages) + state["step_in_epoch"] * accum  # counted on across layouts
    return {"format": STATE_FORMAT, "split": "train", "epoch": state["epoch"], "batch": done, "stages": stages,
            "world_size": layout[1], "batch_size": layout[0], "repeats": max(1, state["config"].get("aug_repeats", 0)),
            "seed": state["config"]["seed"], "shuffle_window": loader.spec.shuffle_window,  # not recorded: the same
            "samples": loader.num_samples if samples is None else samples,
            "shards": data.get("train_shards", loader.fingerprint), "side": loader.side_at(state["epoch"])}


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
    if here is None:  # synthetic input: no set to compare (the loader state compares what there is)
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
