"""The training loop: a `Trainer` runs epochs of optimisation steps from its position, logs loss, throughput and
input wait, checkpoints every --save-steps, stops at a step all ranks agree on when a signal asks (preemption) or when
the loss diverges, evaluates at epoch ends, and holds the state a checkpoint saves and a resume restores. The step is
`trainlib.optim.OptimStep`, the val pass `trainlib.evaluate`, where a checkpoint continues `trainlib.resume`. Device
differences stay behind `trainlib.devices.Device`; backends behind the loader."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import NoReturn

import torch

from model import TRAIN_FLOPS_FACTOR
from pipeline import timed
from trainlib import checkpoint, distributed
from trainlib.config import TrainConfig
from trainlib.evaluate import exact_accuracies
from trainlib.metrics import Throughput
from trainlib.optim import OptimStep
from trainlib.resume import CHECKPOINT_FORMAT, schedule_position


class Preempted(Exception):
    """A stop signal arrived; the run stopped at a step boundary with a checkpoint. The message says where; `signal`
    is the signal's name ("a signal to another rank" when a peer received it); `quiet` on ranks other than 0, which
    stop at the same step and leave the saying to rank 0."""

    def __init__(self, message: str, signal: str, quiet: bool = False):
        super().__init__(message)
        self.signal, self.quiet = signal, quiet


class DivergedError(RuntimeError):
    """The training loss stopped being a finite number; the message says when. No checkpoint was written after it."""


class LossWindow:
    """The training loss summed on the device since the last log line (no per-step sync). A non-finite loss makes the
    sum non-finite, so divergence is read where the host syncs anyway: at log lines and before a checkpoint. Under
    fp16 (`checked` False) the loss scaler skips such steps by design: left to it."""

    def __init__(self, device: torch.device, checked: bool):
        self.sum, self.steps = torch.zeros((), device=device), 0
        self.checked, self.checked_until = checked, 0  # the global step of the last check that passed

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.steps += 1

    def reset(self) -> None:
        self.sum, self.steps = torch.zeros_like(self.sum), 0

    def mean_over_ranks(self) -> float:
        # sync: at a log line, the device is idle already, this costs a copy
        return distributed.mean_over_ranks(self.sum / self.steps).item()

    def check_finite(self, global_step: int, loss: float | None = None) -> None:
        """DivergedError if any rank's loss was not finite since the last check. `loss`: the interval's mean over
        ranks, already read at a log line; without it the sum is reduced and read here (a collective; syncs, which
        a checkpoint does anyway)."""
        if not self.checked:
            return
        if loss is None:
            loss = distributed.sum_over_ranks(self.sum.clone()).item()  # sync: before a checkpoint
        if not math.isfinite(loss):
            raise DivergedError(f"the training loss became non-finite ({loss}) between global "
                                f"steps {self.checked_until + 1} and {global_step}; stopped without "
                                f"writing a checkpoint after it: lower --lr, raise --warmup-epochs or --clip-grad, "
                                f"and resume from the last good checkpoint")
        self.checked_until = global_step


class Trainer:
    """One run's mutable training state (position, best Acc@1, skipped samples) and the loops that advance it."""

    def __init__(self, cfg: TrainConfig, *, raw_model, model, optim: OptimStep, device, log, placement,
                 steps_per_epoch: int, num_classes: int, flops_per_image: dict[int, float] | None,
                 shape, ema=None, data: dict | None = None):
        # raw_model: the bare module (checkpoints); model: what runs the step and evaluation (DDP and/or compiled).
        self.cfg, self.raw_model, self.model, self.optim, self.device = cfg, raw_model, model, optim, device
        self.ema = ema  # timm's ModelEmaV3 of raw_model (--model-ema), or None
        self.best_ema_acc1 = self.ema_acc1 = None
        self.accum = cfg.grad_accum_steps  # loader batches per optimizer step
        self.log, self.placement, self.num_classes = log, placement, num_classes
        self.steps_per_epoch = steps_per_epoch  # a whole epoch's optimizer steps (the LR schedule's unit)
        self.shape = shape  # the run's sides (trainlib/shape.py)
        self.data = data  # the shard set's identity (trainlib.build.data_identity), recorded in checkpoints
        # Whether the file at last.pth may become previous.pth when a save replaces it: one this run wrote or resumed
        # from; not one that failed its checks (--resume auto fell back), nor another run's at a fresh start.
        self.last_is_good = False
        self.epoch, self.step_in_epoch, self.global_step, self.best_acc1 = 0, 0, 0, None
        self.epoch_steps = steps_per_epoch  # this epoch's: fewer in the rest of one resumed on another layout
        self.train_loader = None  # fit's: its position is the checkpoint's
        self.side = shape.train_side(0)  # of the last batch trained on
        self.skipped_samples = 0  # --on-error skip: samples replaced, all ranks, train and val
        self.loss = LossWindow(device.device, checked=not optim.scaler.is_enabled())
        self.stop_signal: str | None = None  # set by a signal handler (train.py): stop at the next agreed boundary
        self.meter = Throughput(device, cfg.batch_size * placement.world_size * self.accum, cfg.warmup_log_steps)
        peak = device.peak_flops(optim.amp_dtype)
        self.train_flops_per_s_peak = peak * placement.world_size if peak and flops_per_image else None
        # per image side: a schedule (--min-res) trains at several
        self.train_flops_per_image = {side: TRAIN_FLOPS_FACTOR * f for side, f in (flops_per_image or {}).items()}

    def step_on(self, batches) -> torch.Tensor:
        """One optimizer step over --grad-accum-steps micro-batches, then the EMA's update (one fused foreach lerp
        over the weights, every step, on each rank's own copy: no communication)."""
        loss = self.optim.accumulate(batches)
        if self.ema is not None:
            self.ema.update(self.raw_model, step=self.global_step + 1)
        return loss

    # -- the epoch loop ------------------------------------------------------------------------------------------

    def fit(self, train_loader, val_loader) -> None:
        """Epochs from the trainer's position (the train loader's, after a resume) to --epochs (or --max-steps),
        evaluating and checkpointing at epoch ends."""
        self.train_loader = train_loader
        while self.epoch < self.cfg.epochs:
            # The loader stands in the trainer's epoch; one step ahead only where a resume found it trained to its end
            # and not yet evaluated (load_state_dict).
            if train_loader.epoch == self.epoch:
                self.epoch_steps = self.steps_in(train_loader)
                if self.step_in_epoch < self.epoch_steps:
                    self.train_epoch(train_loader)
                if self.step_in_epoch < self.epoch_steps:  # stopped by --max-steps inside the epoch
                    self.save_checkpoint()
                    return
            best = False
            if val_loader is not None and ((self.epoch + 1) % self.cfg.eval_freq == 0 or
                                           self.epoch + 1 == self.cfg.epochs):
                val_loader.set_epoch(self.epoch)
                best = self.record_best(self.evaluate(val_loader)[0])
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            # An epoch cut short (--steps-per-epoch, batches short of a --grad-accum-steps group): the checkpoint's
            # loader state is the next epoch's start.
            train_loader.set_epoch(self.epoch)
            self.save_checkpoint(best=best)
            if self.reached_max_steps():
                return

    def steps_in(self, loader) -> int:
        """The optimizer steps of the loader's current epoch in this layout (those done included; after an elastic
        resume the rest of it): its batches in groups of --grad-accum-steps (fewer at its end sit it out),
        --steps-per-epoch at most."""
        done = loader.position.local
        steps = done // self.accum + (len(loader) - loader.position.batch) // self.accum
        return min(steps, self.cfg.steps_per_epoch) if self.cfg.steps_per_epoch else steps

    def train_epoch(self, loader) -> None:
        """Run the current epoch from `self.step_in_epoch` to its end, or until --max-steps. The loader stands
        where the epoch goes on (a resume positioned it): it yields the batches from there."""
        skipped_before = dict(loader.skipped_shards)
        if self.optim.batch_augment is not None:
            self.optim.batch_augment.set_epoch(self.epoch)  # --mixup-off-epoch
        side = loader.side_at(self.epoch)
        if self.epoch == 0 or loader.side_at(self.epoch - 1) != side or self.step_in_epoch:
            if self.shape.schedule is not None:  # a schedule: where its side changes, and where a run resumes
                self.log.print(f"Epoch [{self.epoch}] train images {side} px")
        batches = iter(loader)
        self.meter.start()
        self.loss.reset()
        waits = timed(batches)
        while self.step_in_epoch < self.epoch_steps and not self.reached_max_steps():
            group, wait_s = [], 0.0
            for _ in range(self.accum):
                batch, wait = next(waits)
                group.append(batch)
                wait_s += wait
            logged = self.train_batch(group, wait_s)
            save_steps = self.cfg.save_steps
            if save_steps and self.global_step % save_steps == 0 and self.step_in_epoch < self.epoch_steps:
                self.save_checkpoint()
            if self.stop_agreed(logged):
                self.stop_with_checkpoint()
        self.meter.pause()
        self.report_skipped(loader, skipped_before, "train")

    def train_batch(self, batches, wait_s: float) -> bool:
        """One step on micro-batches that took `wait_s` to arrive, counted and logged; whether it ended a log
        interval (every --print-freq steps and at the epoch's end)."""
        lr = self.optim.lr  # the rate this step uses (the scheduler moves it after)
        self.side = batches[0].side
        self.loss.add(self.step_on(batches))
        self.meter.step(wait_s)  # after the step: an interval that counts it also times its compute
        self.step_in_epoch, self.global_step = self.step_in_epoch + 1, self.global_step + 1
        logged = self.step_in_epoch % self.cfg.print_freq == 0 or self.step_in_epoch == self.epoch_steps
        if logged:
            self.log_train(lr)
            self.loss.reset()
        return logged

    def stop_agreed(self, at_log_line: bool) -> bool:
        """Whether every rank stops here. One process checks its flag after every step. Ranks must agree on the step
        (a rank that stops alone hangs the others in their next collective), so several processes compare flags
        where they synchronize anyway, at log lines (--print-freq): the stop then comes within one log interval."""
        if self.placement.world_size == 1:
            return self.stop_signal is not None
        if not at_log_line:
            return False
        flag = torch.tensor(int(self.stop_signal is not None), device=self.device.device)
        if int(distributed.sum_over_ranks(flag).item()):  # sync: at a log line, the device is idle already
            self.stop_signal = self.stop_signal or "a signal to another rank"
            return True
        return False

    def stop_with_checkpoint(self) -> NoReturn:
        self.save_checkpoint()
        saved = (f"checkpoint written, rerun with --resume auto --output {self.cfg.output} to continue from there"
                 if self.cfg.save_checkpoints else "no checkpoint (--no-save-checkpoints)")
        raise Preempted(f"stopped by {self.stop_signal} at global step {self.global_step} (epoch "
                        f"{self.epoch}, step {self.step_in_epoch}); {saved}", self.stop_signal,
                        quiet=not self.placement.is_main)

    def reached_max_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.global_step >= self.cfg.max_steps

    def log_train(self, lr: float) -> None:
        m = self.meter.lap()  # closes the timed interval (synchronizes)
        loss = self.loss.mean_over_ranks()
        self.loss.check_finite(self.global_step, loss)
        side = self.side
        mfu = (m["img_s"] * self.train_flops_per_image[side] / self.train_flops_per_s_peak
               if self.train_flops_per_s_peak and side in self.train_flops_per_image else None)
        self.log.record("train", epoch=self.epoch, step=self.step_in_epoch, global_step=self.global_step, loss=loss,
                        lr=lr, mfu=mfu, mem_bytes=self.device.max_memory_allocated(), img_size=side, **m)
        line = (f"Epoch [{self.epoch}][{self.step_in_epoch}/{self.epoch_steps}] loss {loss:.4f} lr {lr:.3e} "
                f"img/s {m['img_s']:.1f} input wait {100 * m['input_wait']:.1f}%")
        if m["img_s_mean"] is not None:
            line += (f" | since warm-up: img/s {m['img_s_mean']:.1f} input wait {100 * m['input_wait_mean']:.1f}% "
                     f"FPS@all {m['img_s_mean']:.3f}")
        if mfu is not None:
            line += f" MFU {100 * mfu:.1f}%"
        self.log.print(line)

    def evaluate(self, loader) -> tuple[float, float, int]:
        """Exact Acc@1 / Acc@5 over the whole val split (trainlib.evaluate), printed and recorded; with --model-ema
        the EMA weights' too, in the same pass (`self.ema_acc1`)."""
        skipped_before = dict(loader.skipped_shards)
        t0 = time.perf_counter()
        models = [self.model] + ([self.ema.module] if self.ema is not None else [])
        results = exact_accuracies(models, loader, self.device, self.optim.amp_dtype, self.num_classes)
        (acc1, acc5, n), ema = results[0], results[1] if len(results) > 1 else None
        self.report_skipped(loader, skipped_before, "val")
        self.log.print(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
        extra = {}
        if ema is not None:
            self.ema_acc1 = ema[0]
            self.log.print(f"   EMA Acc@1 {ema[0]:.3f} Acc@5 {ema[1]:.3f}")
            extra = {"ema_acc1": ema[0], "ema_acc5": ema[1]}
        self.log.record("eval", epoch=self.epoch, global_step=self.global_step, acc1=acc1, acc5=acc5, samples=n,
                        seconds=time.perf_counter() - t0, img_size=self.shape.eval_side, **extra)
        return acc1, acc5, n

    def record_best(self, acc1: float) -> bool:
        """Keep the best Acc@1 (and EMA Acc@1) so far; whether this evaluation makes best.pth: by the EMA's Acc@1
        under --model-ema (timm's rule), else by Acc@1."""
        new_best = self.best_acc1 is None or acc1 > self.best_acc1
        self.best_acc1 = max(acc1, self.best_acc1 or acc1)
        if self.ema is None:
            return new_best
        new_best = self.best_ema_acc1 is None or self.ema_acc1 > self.best_ema_acc1
        self.best_ema_acc1 = max(self.ema_acc1, self.best_ema_acc1 or self.ema_acc1)
        return new_best

    def report_skipped(self, loader, before: dict[str, int], split: str) -> None:
        """Samples `loader` skipped since `before` (--on-error skip), summed over ranks (a collective): printed,
        recorded in metrics.jsonl and added to `skipped_samples`, when there are any."""
        now = loader.skipped_shards
        mine = {name: count - before.get(name, 0) for name, count in now.items() if count > before.get(name, 0)}
        shards: dict[str, int] = {}
        for part in distributed.all_gather(mine):
            for name, count in part.items():
                shards[name] = shards.get(name, 0) + count
        total = sum(shards.values())
        if not total:
            return
        self.skipped_samples += total
        where = ", ".join(f"{name} x{count}" for name, count in sorted(shards.items()))
        self.log.print(f"Epoch [{self.epoch}] {split}: skipped {total} undecodable samples (--on-error skip) from "
                       f"{where}")
        self.log.record("skipped", epoch=self.epoch, split=split, samples=total, shards=shards)

    # -- checkpoint state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.raw_model.state_dict(), **self.optim.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "best_acc1": self.best_acc1, "world_size": self.placement.world_size, "config": self.cfg.to_dict(),
                "best_ema_acc1": self.best_ema_acc1, "grad_accum_steps": self.accum,
                **({"model_ema": self.ema.module.state_dict()} if self.ema is not None else {}),
                "skipped_samples": self.skipped_samples, "steps_per_epoch": self.steps_per_epoch,
                "batch_size": self.cfg.batch_size, "data": self.data, "format": CHECKPOINT_FORMAT,
                "loader": self.train_loader.state_dict() if self.train_loader is not None else None}

    def save_checkpoint(self, best: bool = False) -> None:
        """last.pth (previous.pth: the one it replaces; and best.pth); collective: every rank contributes its RNG
        state, rank 0 writes."""
        if not self.cfg.save_checkpoints:
            return
        self.meter.pause()  # checkpoint writing is not training throughput
        self.loss.check_finite(self.global_step)  # never a checkpoint of a diverged model
        augment = self.optim.batch_augment
        rng = distributed.all_gather({**checkpoint.rng_state(self.device),
                                      "batch_augment": augment.state_dict() if augment is not None else {}})
        if self.placement.is_main:
            out = Path(self.cfg.output)
            # previous.pth: the last.pth this save replaces, for --resume auto to fall back to (checkpoint.load_resume)
            checkpoint.save(out / checkpoint.LAST, {**self.state_dict(), "rng": rng},
                            previous=out / checkpoint.PREVIOUS if self.last_is_good else None)
            self.last_is_good = True
            if best:
                checkpoint.copy_as(out / checkpoint.LAST, out / checkpoint.BEST)
        self.meter.start()

    def load_state_dict(self, state: dict, loader=None, other_data: bool = False) -> None:
        """Continue where `state` stopped: weights, optimizer, LR schedule, loss scale, position, RNG streams. The
        position is `loader`'s, the train loader that loaded the checkpoint's state (trainlib.resume.loader_state):
        None (evaluation) takes the weights alone; `other_data` (--resume-other-data, another shard set) the weights
        and optimizer state, at epoch 0 of a new LR schedule."""
        try:
            self.raw_model.load_state_dict(state["model"])
        except RuntimeError as e:  # another model, image size or class count
            raise checkpoint.CheckpointError(f"the checkpoint does not fit this model: {str(e).splitlines()[0]} "
                                             f"(another --model, --img-size or data set?)") from None
        if other_data:  # another shard set: its position and best mean nothing here
            self.load_ema(state)
            self.optim.load_state_dict(state, schedule_at=0)
            return
        self.epoch, self.global_step, self.best_acc1 = state["epoch"], state["global_step"], state["best_acc1"]
        self.best_ema_acc1 = state.get("best_ema_acc1") if self.ema is not None else None
        self.load_ema(state)
        if loader is None:
            return
        if loader.epoch == self.epoch:
            self.step_in_epoch, self.epoch_steps = loader.position.local // self.accum, self.steps_in(loader)
        else:  # stopped in the epoch's last step: the loader stands at the next epoch's start, and the epoch's
            # evaluation and end-of-epoch checkpoint are still to come (fit goes on with them)
            self.step_in_epoch = self.epoch_steps = state["step_in_epoch"]
        self.skipped_samples = state.get("skipped_samples", 0)  # older checkpoints did not count
        self.global_step = schedule_position(self.cfg, self.steps_per_epoch, self.epoch, self.step_in_epoch,
                                             self.epoch_steps)
        self.resume_schedule(state)
        layout = state.get("batch_size", state["config"]["batch_size"]), state["world_size"], \
            state.get("grad_accum_steps", 1)
        self.resume_random_streams(state, exact=layout == (self.cfg.batch_size, self.placement.world_size,
                                                           self.accum))

    def load_ema(self, state: dict) -> None:
        """The checkpoint's EMA weights; a checkpoint without them (--model-ema turned on at a resume) starts the
        average from the weights it holds."""
        if self.ema is None:
            return
        if "model_ema" in state:
            self.ema.module.load_state_dict(state["model_ema"])
        else:
            self.ema.set(self.raw_model)
            self.log.print("note: the checkpoint holds no EMA weights (--model-ema was off): the average starts "
                           "from its weights")

    def resume_schedule(self, state: dict) -> None:
        """The optimizer's state, and the LR schedule at `self.global_step`: the checkpoint's own when this run is as
        long and stands where it stood, else this run's, recomputed. After a decay, extending a run raises the LR:
        the cosine restarts its descent from that point of the longer curve."""
        same = (self.global_step == state["global_step"] and
                self.cfg.epochs * self.steps_per_epoch == state["config"]["epochs"] * state["steps_per_epoch"] and
                self.cfg.layer_decay == state["config"].get("layer_decay"))  # else the groups' LRs start anew
        self.optim.load_state_dict(state, schedule_at=None if same else self.global_step)
        if same:
            return
        self.log.print(f"note: the LR schedule is recomputed for {self.cfg.epochs} epochs of {self.steps_per_epoch} "
                       f"steps (the checkpoint's: {state['config']['epochs']} of {state['steps_per_epoch']}); at step "
                       f"{self.global_step} of it the LR is {self.optim.lr:.3e} (the checkpoint's last was "
                       f"{max(g['lr'] for g in state['optimizer']['param_groups']):.3e})")

    def resume_random_streams(self, state: dict, exact: bool) -> None:
        """The checkpoint's streams for this rank on its own layout (`exact`); on another (elastic) fresh ones, which
        cannot repeat an uninterrupted run anyway."""
        if exact:
            checkpoint.set_rng_state(state["rng"][self.placement.rank], self.device)
            if self.optim.batch_augment is not None:
                self.optim.batch_augment.load_state_dict(state["rng"][self.placement.rank].get("batch_augment", {}))
            return
        self.log.print(f"note: elastic resume: the checkpoint's run was {state['world_size']} x "
                       f"{state.get('batch_size', state['config']['batch_size'])} x "
                       f"{state.get('grad_accum_steps', 1)} (ranks x batch x micro-batches), this one "
                       f"{self.placement.world_size} x {self.cfg.batch_size} x {self.accum}; epoch {self.epoch} "
                       f"goes on with the "
                       f"{self.epoch_steps} steps of samples it has not trained on; random streams start anew")
        # Fresh per-rank streams (drop path differs across ranks), new ones for each resume point.
        seed = self.cfg.seed + self.placement.rank + 1_000_003 * self.global_step
        torch.manual_seed(seed)
        self.device.manual_seed(seed)
        if self.optim.batch_augment is not None:
            self.optim.batch_augment.reseed(seed)
