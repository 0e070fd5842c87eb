"""The training step, the epoch loop, evaluation and checkpoint state: the part of train.py that runs once the model,
loaders and process group exist. Device differences stay behind `trainlib.devices.Device`; backends behind the
loader."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch.optim import lr_scheduler

from model import TRAIN_FLOPS_FACTOR
from pipeline import timed
from pipeline.plan import Stage
from trainlib import checkpoint, distributed
from trainlib.config import TrainConfig
from trainlib.metrics import Throughput, TopK


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and the cls/position tokens (timm's ViT lists those in no_weight_decay()).
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    cls, extra = (torch.optim.SGD, {"momentum": cfg.momentum}) if cfg.opt == "sgd" else (torch.optim.AdamW, {})
    # Fused kernels only on CUDA, where torch ships them: elsewhere (npu) the constructor can accept fused=True and the
    # first step() fail, past where a fallback could catch it.
    kernel = {"fused": True} if cfg.fused_opt and device.kind == "cuda" else {"foreach": True}
    return cls(groups, lr=cfg.lr, **kernel, **extra)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Linear warm-up then cosine decay to --min-lr, stepped once per optimizer step over the whole run (so a run cut
    short by --max-steps and resumed follows the same curve)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    eta_min = min(cfg.min_lr, cfg.lr)
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=eta_min)
    if warmup <= 0:
        return cosine
    # Starting at lr/(warmup+1) makes the ramp reach the peak exactly when cosine takes over.
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


class Preempted(Exception):
    """A stop signal arrived; the run stopped at a step boundary with a checkpoint. The message says where; `signal`
    is the signal's name ("a signal to another rank" when a peer received it)."""

    def __init__(self, message: str, signal: str):
        super().__init__(message)
        self.signal = signal


class DivergedError(RuntimeError):
    """The training loss stopped being a finite number; the message says when. No checkpoint was written after it."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint's run continues in this run's layout (world size x batch size)."""

    step_in_epoch: int  # steps of this layout already done in the checkpoint's epoch
    stages: tuple[Stage, ...] = ()  # layouts that ran part of that epoch before this one (pipeline/plan.py rule 6)
    exact: bool = True  # the checkpoint's layout: the same batches and random streams as an uninterrupted run


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
    layout = state.get("batch_size", state["config"]["batch_size"]), state["world_size"]
    recorded = state.get("train_samples")  # None in checkpoints older than elastic resume, and without shards
    same_data = recorded == train_samples if recorded is not None else state["steps_per_epoch"] == steps_per_epoch
    if layout == (cfg.batch_size, world_size) and state["steps_per_epoch"] == steps_per_epoch and same_data:
        return ResumePoint(state["step_in_epoch"], stages)
    if not same_data:
        raise checkpoint.CheckpointError(
            f"the checkpoint's run trained on {recorded or state['steps_per_epoch']} "
            f"{'samples' if recorded else 'steps per epoch'}, this one has {train_samples or steps_per_epoch}: "
            f"resume on the same data, or start a new run from its weights with --pretrained")
    if recorded is None:
        raise checkpoint.CheckpointError(
            f"the checkpoint's run was {layout[1]} x {layout[0]} (ranks x batch), this one {world_size} x "
            f"{cfg.batch_size}, and the checkpoint does not record its data (synthetic input, or an older "
            f"checkpoint): it resumes only on its own layout")
    if cfg.steps_per_epoch or state["config"].get("steps_per_epoch"):
        raise checkpoint.CheckpointError(
            "--steps-per-epoch caps epochs for performance runs; such a run resumes only on its own world size "
            "and batch size")
    if state["step_in_epoch"]:  # the epoch goes on with the samples the layouts before did not read
        stages += (Stage(state["world_size"], layout[0], state["step_in_epoch"]),)
    return ResumePoint(0, stages, exact=False)


class Trainer:
    """One run's mutable training state and the loops that advance it."""

    def __init__(self, cfg: TrainConfig, *, raw_model, model, optimizer, scheduler, device, amp_dtype, log, placement,
                 steps_per_epoch: int, num_classes: int, flops_per_image: float | None,
                 train_samples: int | None = None):
        # raw_model: the bare module (checkpoints, clipping); model: what runs the step (DDP and/or compiled).
        self.cfg, self.raw_model, self.model = cfg, raw_model, model
        self.optimizer, self.scheduler, self.device, self.amp_dtype = optimizer, scheduler, device, amp_dtype
        self.scaler = device.grad_scaler(enabled=amp_dtype == torch.float16)
        self.log, self.placement, self.num_classes = log, placement, num_classes
        self.steps_per_epoch, self.train_samples = steps_per_epoch, train_samples
        self.epoch, self.step_in_epoch, self.global_step, self.best_acc1 = 0, 0, 0, None
        # This epoch's steps and the layouts that ran part of it before an elastic resume (none: a whole epoch).
        self.epoch_steps, self.stages = steps_per_epoch, ()
        self.skipped_samples = 0  # --on-error skip: samples replaced, all ranks, train and val
        # The loss summed on the device since the last log line (no per-step sync). A non-finite loss makes the sum
        # non-finite, so divergence is read where the host syncs anyway: at log lines and before a checkpoint.
        self.loss_sum, self.loss_steps = torch.zeros((), device=device.device), 0
        self.last_checked_step = 0
        self.stop_signal: str | None = None  # set by a signal handler (train.py): stop at the next agreed boundary
        self.meter = Throughput(device, cfg.batch_size * placement.world_size, cfg.warmup_log_steps)
        peak = device.peak_flops(amp_dtype)
        self.train_flops_per_s_peak = peak * placement.world_size if peak and flops_per_image else None
        self.train_flops_per_image = TRAIN_FLOPS_FACTOR * flops_per_image if flops_per_image else None

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.device.autocast(self.amp_dtype):
            loss = F.cross_entropy(self.model(images), labels, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def train_epoch(self, loader) -> None:
        """Run the current epoch from `self.step_in_epoch` to its end, or until --max-steps. A resumed epoch is
        re-entered from its start and the finished steps are drawn and dropped: the loader yields the same batches in
        the same order, at the cost of reading them again."""
        cfg, steps_per_epoch = self.cfg, self.epoch_steps
        skipped_before = dict(loader.skipped_shards)
        batches = iter(loader)
        for _ in range(self.step_in_epoch):
            next(batches)
        self.meter.start()
        self.loss_sum, self.loss_steps = torch.zeros_like(self.loss_sum), 0
        waits = timed(batches)
        while self.step_in_epoch < steps_per_epoch and not self.reached_max_steps():
            (images, labels), wait_s = next(waits)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
            self.loss_sum += self.step(images, labels)
            self.meter.step(wait_s)  # after the step: an interval that counts it also times its compute
            self.step_in_epoch, self.global_step = self.step_in_epoch + 1, self.global_step + 1
            self.loss_steps += 1
            logged = self.step_in_epoch % cfg.print_freq == 0 or self.step_in_epoch == steps_per_epoch
            if logged:
                self.log_train(lr)
                self.loss_sum, self.loss_steps = torch.zeros_like(self.loss_sum), 0
            if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.step_in_epoch < steps_per_epoch:
                self.save_checkpoint()
            if self.stop_agreed(logged):
                self.save_checkpoint()
                saved = (f"checkpoint written, rerun with --resume auto --output {cfg.output} to continue from there"
                         if cfg.save_checkpoints else "no checkpoint (--no-save-checkpoints)")
                raise Preempted(f"stopped by {self.stop_signal} at global step {self.global_step} (epoch "
                                f"{self.epoch}, step {self.step_in_epoch}); {saved}", self.stop_signal)
        self.meter.pause()
        self.report_skipped(loader, skipped_before, "train")

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

    def fast_forward_schedule(self, state: dict, position: int) -> None:
        """--epochs or the steps per epoch changed on resume: the warm-up + cosine schedule, built over this run's
        length, is stepped to `position`, the step from which the steps left end the run with it. After a decay,
        extending a run raises the LR: the cosine restarts its descent from that point of the longer curve."""
        before = state["optimizer"]["param_groups"][0]["lr"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            for _ in range(position):
                self.scheduler.step()
        self.log.print(f"note: the LR schedule is recomputed for {self.cfg.epochs} epochs of {self.steps_per_epoch} "
                       f"steps (the checkpoint's: {state['config']['epochs']} of {state['steps_per_epoch']}); at step "
                       f"{position} of it the LR is {self.optimizer.param_groups[0]['lr']:.3e} (the checkpoint's last "
                       f"was {before:.3e})")

    def check_finite(self, loss: float | None = None) -> None:
        """DivergedError if any rank's loss was not finite since the last check. `loss`: the interval's mean over
        ranks, already read at a log line; without it the loss sum is reduced and read here (a collective; syncs,
        which a checkpoint does anyway). Under fp16 the loss scaler skips such steps by design: left to it."""
        if self.scaler.is_enabled():
            return
        if loss is None:
            loss = distributed.sum_over_ranks(self.loss_sum.clone()).item()  # sync: before a checkpoint
        if not math.isfinite(loss):
            raise DivergedError(f"the training loss became non-finite ({loss}) between global "
                                f"steps {self.last_checked_step + 1} and {self.global_step}; stopped without "
                                f"writing a checkpoint after it: lower --lr, raise --warmup-epochs or --clip-grad, "
                                f"and resume from the last good checkpoint")
        self.last_checked_step = self.global_step

    def reached_max_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.global_step >= self.cfg.max_steps

    def log_train(self, lr: float) -> None:
        m = self.meter.lap()  # closes the timed interval (synchronizes)
        # sync: the device is idle already, this costs a copy
        loss = distributed.mean_over_ranks(self.loss_sum / self.loss_steps).item()
        self.check_finite(loss)
        mfu = (m["img_s"] * self.train_flops_per_image / self.train_flops_per_s_peak
               if self.train_flops_per_s_peak else None)
        self.log.record("train", epoch=self.epoch, step=self.step_in_epoch, global_step=self.global_step, loss=loss,
                        lr=lr, mfu=mfu, mem_bytes=self.device.max_memory_allocated(), **m)
        line = (f"Epoch [{self.epoch}][{self.step_in_epoch}/{self.epoch_steps}] loss {loss:.4f} lr {lr:.3e} "
                f"img/s {m['img_s']:.1f} input wait {100 * m['input_wait']:.1f}%")
        if m["img_s_mean"] is not None:
            line += (f" | since warm-up: img/s {m['img_s_mean']:.1f} input wait {100 * m['input_wait_mean']:.1f}% "
                     f"FPS@all {m['img_s_mean']:.3f}")
        if mfu is not None:
            line += f" MFU {100 * mfu:.1f}%"
        self.log.print(line)

    @torch.no_grad()
    def evaluate(self, loader) -> tuple[float, float, int]:
        """Exact Acc@1 / Acc@5 over the whole val split (all ranks' shares, padding skipped)."""
        self.model.eval()
        topk = TopK(self.device.device, self.num_classes)
        skipped_before = dict(loader.skipped_shards)
        t0 = time.perf_counter()
        for images, labels in loader:
            with self.device.autocast(self.amp_dtype):
                logits = self.model(images)
            topk.update(logits, labels)
        acc1, acc5, n = topk.result()
        self.report_skipped(loader, skipped_before, "val")
        self.model.train()
        self.log.print(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
        self.log.record("eval", epoch=self.epoch, global_step=self.global_step, acc1=acc1, acc5=acc5, samples=n,
                        seconds=time.perf_counter() - t0)
        return acc1, acc5, n

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

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "best_acc1": self.best_acc1, "world_size": self.placement.world_size, "config": self.cfg.to_dict(),
                "skipped_samples": self.skipped_samples, "steps_per_epoch": self.steps_per_epoch,
                "batch_size": self.cfg.batch_size, "train_samples": self.train_samples,
                "epoch_stages": [[s.world_size, s.batch_size, s.steps_done] for s in self.stages]}

    def save_checkpoint(self, best: bool = False) -> None:
        """last.pth (and best.pth); collective: every rank contributes its RNG state, rank 0 writes."""
        if not self.cfg.save_checkpoints:
            return
        self.meter.pause()  # checkpoint writing is not training throughput
        self.check_finite()  # never a checkpoint of a diverged model
        rng = distributed.all_gather(checkpoint.rng_state(self.device))
        if self.placement.is_main:
            out = Path(self.cfg.output)
            checkpoint.save(out / checkpoint.LAST, {**self.state_dict(), "rng": rng})
            if best:
                checkpoint.copy_as(out / checkpoint.LAST, out / checkpoint.BEST)
        self.meter.start()

    def load_state_dict(self, state: dict, point: ResumePoint | None = None, epoch_steps: int | None = None) -> None:
        """Continue where `state` stopped: weights, optimizer, LR schedule, loss scale, position, RNG streams.
        `point` (from `resume_point`) places it in this layout, whose loader for the rest of the epoch has
        `epoch_steps` steps; None (evaluation) takes the weights alone."""
        try:
            self.raw_model.load_state_dict(state["model"])
        except RuntimeError as e:  # another model, image size or class count
            raise checkpoint.CheckpointError(f"the checkpoint does not fit this model: {str(e).splitlines()[0]} "
                                             f"(another --model, --img-size or data set?)") from None
        self.epoch, self.global_step, self.best_acc1 = state["epoch"], state["global_step"], state["best_acc1"]
        if point is None:
            return
        fresh_lrs = [g["lr"] for g in self.optimizer.param_groups]  # the new schedule's start, before any step
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():  # resumed under another precision: fp16's scale starts anew
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.stages = state["epoch"], point.step_in_epoch, point.stages
        self.epoch_steps = self.steps_per_epoch if epoch_steps is None else epoch_steps
        self.skipped_samples = state.get("skipped_samples", 0)  # older checkpoints did not count
        # The schedule's position: the step from which the steps this run has left end it with the schedule.
        steps_left = self.epoch_steps - self.step_in_epoch + (self.cfg.epochs - self.epoch - 1) * self.steps_per_epoch
        self.global_step = self.cfg.epochs * self.steps_per_epoch - steps_left
        if (self.global_step == state["global_step"] and
                self.cfg.epochs * self.steps_per_epoch == state["config"]["epochs"] * state["steps_per_epoch"]):
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # the schedulers step from the LR they find: give them their start back
            for group, lr in zip(self.optimizer.param_groups, fresh_lrs):
                group["lr"] = lr
            self.fast_forward_schedule(state, self.global_step)
        if point.exact:
            checkpoint.set_rng_state(state["rng"][self.placement.rank], self.device)
            return
        self.log.print(f"note: elastic resume: the checkpoint's run was {state['world_size']} x "
                       f"{state.get('batch_size', state['config']['batch_size'])} (ranks x batch), this one "
                       f"{self.placement.world_size} x {self.cfg.batch_size}; epoch {self.epoch} goes on with the "
                       f"{self.epoch_steps} steps of samples it has not trained on; random streams start anew")
        # Fresh per-rank streams (drop path differs across ranks), new ones for each resume point.
        seed = self.cfg.seed + self.placement.rank + 1_000_003 * self.global_step
        torch.manual_seed(seed)
        self.device.manual_seed(seed)
