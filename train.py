"""Train (or evaluate) a timm ViT on webdataset shards: ViT-B/32 on ImageNet by default.

    python train.py --data_path SHARDS --device cpu ...                      # one process
    torchrun --nproc_per_node=8 train.py --data_path SHARDS ...             # DDP, one process per device
    python train.py --data_path SHARDS --multiprocessing-distributed ...    # the seed's launcher (torchrun preferred)

Flags: `python train.py -h` or docs/training.md (both generated from trainlib.config.TrainConfig). The run folder
(--output) gets config.json, env.json, metrics.jsonl, last.pth / best.pth, summary.json and plots.png.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import time
from pathlib import Path

from model import CheckpointMismatch
from pipeline import PipelineError, SettingsError, StateError
from pipeline.dali import DaliMissingError
from trainlib import checkpoint, distributed
from trainlib.build import (build_loaders, build_trainer, check_contents, check_model, class_count, compiled_graphs,
                            data_identity, seed_everything)
from trainlib.config import ConfigError, TrainConfig, parse_config
from trainlib.devices import DeviceError, resolve_device
from trainlib.engine import DivergedError, Preempted, Trainer
from trainlib.resume import check_data, check_position, loader_state
from trainlib.runlog import QuietLog, RunLog, environment, final_lines, plot_metrics
from trainlib.runlock import NoLock, RunLock

EXIT_PREEMPTED = 143  # 128 + SIGTERM, as a process killed by it would report; here the checkpoint is written
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, the same checkpoint


def run(cfg: TrainConfig) -> None:
    """One process's whole run: device, process group, loaders, model, resume, epochs, summary."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.compile:
        device.compile_backend()  # an npu without TorchAir: one line now, before the process group or any file
    placement = distributed.placement(cfg)
    # One run per run folder (--evaluate writes into it too): rank 0 locks it before reading it (--resume auto) and
    # holds it to the end; a run that fails to start removes the folder it made (trainlib/runlock.py).
    lock = RunLock(cfg.output) if placement.is_main else NoLock()
    for note in lock.notes():
        print(note, flush=True)
    log, loaders, handlers = QuietLog(), (), {}
    try:
        resume_path = checkpoint.resolve_resume(cfg.resume, cfg.output)
        if cfg.evaluate and resume_path is None and not cfg.pretrained:
            raise ConfigError(f"--evaluate --resume {cfg.resume}: no checkpoint in {cfg.output}")
        distributed.setup(cfg, device, placement)
        check_same_resume(cfg, resume_path)
        # Everything that can be checked is, before the run's first file is written: a failed start leaves nothing
        # behind that a later --resume auto could mistake for a run (the lock removes a folder it made).
        shards = cfg.open_data()  # the manifest and class list, read once for everything below
        classes = class_count(cfg, shards)
        shape = check_model(cfg, classes)  # the model's patch and the sides of the run, found once
        data = data_identity(cfg, shards)  # what the checkpoints record of the shard set, and a resume compares
        state, other_data, notes = None, False, []
        if resume_path is not None:  # --resume auto: a last.pth that fails its checks falls back to an earlier one
            resume_path, state, notes = checkpoint.load_resume(cfg.resume, resume_path)
            other_data, note = check_data(state, data, cfg, resume_path)
            notes += [note] if note else []
        resuming = state is not None and not cfg.evaluate and not other_data  # the run's position, not only weights
        if resuming:
            check_position(state, cfg, placement.world_size)
        checked = check_contents(cfg, placement, shards)  # before a loader plans with a shard unlike the manifest's
        loaders = build_loaders(cfg, device, placement, classes, shape, checked, shards)
        train_loader, val_loader = loaders
        steps_per_epoch = optimizer_steps(cfg, train_loader.batches_in()) if train_loader is not None else 1
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps_per_epoch
        if resuming:  # the loader stands where the checkpoint's run stopped, in this run's layout
            try:
                train_loader.load_state_dict(loader_state(state, cfg, train_loader, steps_per_epoch))
            except StateError as e:
                e.quiet = not placement.is_main  # every rank refuses the same state: rank 0 says it
                raise
        if placement.is_main:
            log = RunLog(cfg.output, append=resume_path is not None, tensorboard=cfg.tensorboard)
            for stale in checkpoint.remove_stale_temp_files(cfg.output):  # left by a writer killed mid-save
                log.print(f"removed {stale}, a checkpoint write that a killed process left unfinished")
        for note in notes:
            log.print(note)
        for line in checked.lines() if checked is not None else ():
            log.print(line)
        trainer = build_trainer(cfg, device, placement, log, steps_per_epoch, classes, data, shape)  # --pretrained
        handlers = stop_on_signals(trainer)
        if state is not None:
            trainer.load_state_dict(state, train_loader if resuming else None, other_data)
            log.print(f"resumed {resume_path}: epoch {trainer.epoch} step {trainer.step_in_epoch} "
                      f"(global {trainer.global_step})")
            trainer.last_is_good = resume_path.resolve() == (Path(cfg.output) / checkpoint.LAST).resolve()
        if state is None or other_data:
            seed_everything(cfg.seed + placement.rank, device)  # per-rank streams (drop path, ...) from here on
        # The first files of the run folder (RunLog writes nothing before): the weights and checkpoint fit.
        log.write_json("config.json", cfg.to_dict())
        log.write_json("env.json", {**environment(device, placement.world_size), **{
            f"{name}_loader": loader.describe() for name, loader in (("train", train_loader), ("val", val_loader))
            if loader is not None}})
        log.print(f"{cfg.model} {classes} classes, {placement.world_size} x {device.name()}, {cfg.backend} input, "
                  f"{str(trainer.optim.amp_dtype).removeprefix('torch.')}, {steps_per_epoch} steps/epoch x "
                  f"{cfg.batch_size} x {placement.world_size}"
                  + (f" x {cfg.grad_accum_steps} micro-batches" if cfg.grad_accum_steps > 1 else ""))
        for note in train_loader.notes() if train_loader is not None else ():
            log.print(note)
        if cfg.aug_repeats > placement.world_size and not cfg.evaluate:
            log.print(f"note: --aug-repeats {cfg.aug_repeats} on {placement.world_size} rank(s): some copies of a "
                      f"sample share a rank (each goes to a rank of its own from {cfg.aug_repeats} ranks on)")
        if cfg.evaluate:
            trainer.evaluate(val_loader)
            return
        if trainer.epoch >= cfg.epochs or trainer.reached_max_steps():
            # A finished run resumed (say by a launch script's --resume auto): keep its summary.json and figures.
            log.print(f"nothing to train: the checkpoint is at epoch {trainer.epoch}, step {trainer.global_step}")
            for line in final_lines(cfg.output) if placement.is_main else ():
                log.print(line)  # its figures again, for the scripts that read them from this output
            return
        if state is not None:  # the steps after the checkpoint come again: readers drop their first records
            # (--resume-other-data counts from step 1 again: what the folder logged before is another data set's)
            start = trainer.global_step + 1 if other_data else state["global_step"] + 1
            log.record("resume", from_step=start, next_step=trainer.global_step + 1, epoch=state["epoch"],
                       checkpoint=str(resume_path))
        trainer.fit(train_loader, val_loader)
        summarize(cfg, trainer, log, time.perf_counter() - t_start)
    except RuntimeError as e:
        lost = distributed.lost_peer(e, cfg, placement)
        if lost is None:
            raise
        raise lost from None
    finally:
        for loader in loaders:
            if loader is not None:
                loader.close()
        log.close()
        distributed.teardown()
        lock.release()
        # Last: through the clean-up, up to the line main() prints, a SIGTERM only asks for a stop (torchrun sends one
        # to every rank as soon as a peer dies); restored first, it would end the process silently before its line.
        for sig, handler in handlers.items():
            signal.signal(sig, handler)  # as they were: a caller (a test, a notebook) keeps its own handling


def optimizer_steps(cfg: TrainConfig, batches: int) -> int:
    """A whole epoch's optimizer steps: its loader batches in groups of --grad-accum-steps (fewer than that many
    batches at its end sit it out, as samples do that cannot fill a batch)."""
    steps = batches // cfg.grad_accum_steps
    if steps == 0:
        raise ConfigError(f"--grad-accum-steps {cfg.grad_accum_steps}: an epoch has only {batches} batches of "
                          f"{cfg.batch_size} per rank; lower it or --batch-size")
    return steps


def check_same_resume(cfg: TrainConfig, resume_path: Path | None) -> None:
    """ConfigError unless every rank resumes from the same file (a collective). Only rank 0 writes checkpoints: with
    --resume auto every rank must see the same file, or ranks would start from different steps and hang in the first
    collective that one of them skips."""
    seen = distributed.all_gather(None if resume_path is None else str(resume_path))
    if len(set(seen)) > 1:
        raise ConfigError(f"--resume {cfg.resume}: ranks found different checkpoints {sorted(set(map(str, seen)))}; "
                          f"put --output on storage that every node sees, or pass --resume PATH")


def stop_on_signals(trainer: Trainer) -> dict:
    """SIGTERM (what Slurm and Kubernetes send before they kill a job), SIGUSR1 (Slurm's --signal) and a first Ctrl-C
    (SIGINT) ask the trainer to stop at the next step boundary all ranks agree on, with a checkpoint at that step; see
    Trainer.stop_agreed. A second Ctrl-C stops at once (KeyboardInterrupt). Returns the handlers they replace."""
    def request_stop(signum, frame):
        if signum == signal.SIGINT and trainer.stop_signal == "SIGINT":
            raise KeyboardInterrupt
        trainer.stop_signal = signal.Signals(signum).name
        if signum == signal.SIGINT and trainer.placement.is_main:
            print("train.py: stopping at the next step with a checkpoint; Ctrl-C again stops at once", file=sys.stderr)

    return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}


def summarize(cfg: TrainConfig, trainer: Trainer, log, wall_s: float) -> None:
    meter = trainer.meter
    fps, scope = meter.mean_img_s(), "after warm-up"
    if fps is None:  # a run that never left its warm-up: its only figure is over every step it timed
        fps, scope = meter.all_img_s(), "all steps, inside warm-up"
    summary = {"fps": fps, "fps_scope": scope, "input_wait": meter.mean_input_wait(), "best_acc1": trainer.best_acc1,
               "global_step": trainer.global_step, "epochs_done": trainer.epoch, "wall_s": wall_s,
               "skipped_samples": trainer.skipped_samples}
    if trainer.ema is not None:
        summary["best_ema_acc1"] = trainer.best_ema_acc1
    if cfg.compile:
        summary["compiled_graphs"] = compiled_graphs()
        log.print(f"torch.compile: {summary['compiled_graphs']} graphs (one per image side and train/eval mode)")
    log.record("summary", **summary)
    log.write_json("summary.json", summary)
    if scope == "after warm-up":
        log.print(f"FPS@all {fps:.3f}")
    else:
        log.print(f"FPS@all {fps or 0.0:.3f} ({meter.all_steps} steps, inside the {cfg.warmup_log_steps}-step warm-up)")
    best = "n/a" if trainer.best_acc1 is None else f"{trainer.best_acc1:.3f}"
    if trainer.best_ema_acc1 is not None:
        best += f" (EMA {trainer.best_ema_acc1:.3f})"
    log.print(f"summary: {trainer.global_step} steps, best Acc@1 {best}, wall {wall_s:.1f} s, "
              f"output {cfg.output}")
    if cfg.plots and isinstance(log, RunLog):
        plot_metrics(Path(cfg.output))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    if cfg.multiprocessing_distributed and "RANK" not in os.environ:
        # Each spawned process prints its own error (run_reported); the launcher passes on the first failed status.
        return reported(cfg, lambda: distributed.spawn(cfg, resolve_device(cfg.device), run_reported))
    return run_reported(cfg)


def run_reported(cfg: TrainConfig) -> int:
    """One process's exit status: run(cfg), an error it ends with printed in one line (alone, under torchrun, or
    spawned by --multiprocessing-distributed)."""
    return reported(cfg, lambda: run(cfg))


def reported(cfg: TrainConfig, work) -> int:
    """`work()`'s exit status (what it returns, else 0); an error it raises is printed in one line and mapped to one."""
    try:
        return work() or 0
    except (ConfigError, DeviceError, SettingsError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except (PipelineError, CheckpointMismatch, checkpoint.CheckpointError, DaliMissingError, FileNotFoundError,
            DivergedError, distributed.DistributedError) as e:
        if not getattr(e, "quiet", False):  # the same error on every rank is rank 0's to print
            print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        if not e.quiet:
            print(f"train.py: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED if e.signal == "SIGINT" else EXIT_PREEMPTED
    except KeyboardInterrupt:
        # Loaders and the process group were closed on the way out; the last checkpoint is intact (atomic writes).
        print(f"train.py: interrupted; rerun with --resume auto --output {cfg.output} to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    status = main()
    # The interpreter's shutdown would walk every object torch and timm made, looking for garbage: about 1 s of CPU
    # (1.5-3 s on a loaded 2-core machine), and a launcher sees a rank end, and acts on it, only after that. Frozen,
    # they are left to the OS; atexit handlers still run and open files are flushed as usual.
    gc.freeze()
    sys.exit(status)
