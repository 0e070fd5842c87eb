"""The optimisation step and what it drives: the optimizer and the LR schedule train.py builds, and `OptimStep`, one
forward/backward/clip/update under autocast and the fp16 loss scaler, with the optimizer-side state a checkpoint
keeps (moments, schedule, loss scale)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch.optim import lr_scheduler

from trainlib.config import TrainConfig


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


class OptimStep:
    """Calling it runs one training step on a batch and returns the loss, detached (still on the device: reading it
    would sync). `model` runs the step (DDP and/or compiled); `raw_model` is the bare module whose gradients are
    clipped."""

    def __init__(self, *, model, raw_model, optimizer, scheduler, device, amp_dtype, label_smoothing: float,
                 clip_grad: float):
        self.model, self.raw_model, self.optimizer, self.scheduler = model, raw_model, optimizer, scheduler
        self.device, self.amp_dtype = device, amp_dtype
        self.label_smoothing, self.clip_grad = label_smoothing, clip_grad
        self.scaler = device.grad_scaler(enabled=amp_dtype == torch.float16)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.device.autocast(self.amp_dtype):
            loss = F.cross_entropy(self.model(images), labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    @property
    def lr(self) -> float:
        """The rate the next step uses (the scheduler moves it after the step)."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, schedule_at: int | None = None) -> None:
        """The moments and loss scale of a checkpoint `state`; its LR schedule too when `schedule_at` is None. Else
        the schedule built for this run (another length) is stepped to `schedule_at` from its own start."""
        fresh_lrs = [g["lr"] for g in self.optimizer.param_groups]  # the new schedule's start, before any step
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():  # resumed under another precision: fp16's scale starts anew
            self.scaler.load_state_dict(state["scaler"])
        if schedule_at is None:
            self.scheduler.load_state_dict(state["scheduler"])
            return
        for group, lr in zip(self.optimizer.param_groups, fresh_lrs):  # the schedulers step from the LR they find
            group["lr"] = lr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            for _ in range(schedule_at):
                self.scheduler.step()
