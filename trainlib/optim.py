"""The optimisation step and what it drives: the optimizer (layer-wise LR decay included) and the LR schedule train.py
builds, the loss, and `OptimStep`, one optimizer step over one or more micro-batches (gradient accumulation): batch
augmentation, forward/backward under autocast and the fp16 loss scaler, clip, update; with the optimizer-side state a
checkpoint keeps (moments, schedule, loss scale)."""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch.optim import lr_scheduler

from trainlib.checkpoint import CheckpointError
from trainlib.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and the cls/position tokens (timm's ViT lists those in no_weight_decay()).
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    if cfg.layer_decay is not None:
        # timm's groups (the ViT's group_matcher: embeddings, each block, the head), each with an "lr_scale"; the
        # schedule multiplies every group's own LR by the same factor, so its min LR scales too, as timm's does.
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip,
                                          layer_decay=cfg.layer_decay)
        for group in groups:
            group["lr"] = cfg.lr * group["lr_scale"]
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    cls, extra = (torch.optim.SGD, {"momentum": cfg.momentum}) if cfg.opt == "sgd" else (torch.optim.AdamW, {})
    # Fused kernels only on CUDA, where torch ships them: elsewhere (npu) the constructor can accept fused=True and the
    # first step() fail, past where a fallback could catch it.
    kernel = {"fused": True} if cfg.fused_opt and device.kind == "cuda" else {"foreach": True}
    return cls(groups, lr=cfg.lr, **kernel, **extra)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int):
    """The LR of optimizer step s over the peak, f(s): a linear warm-up from 1/(warmup+1) that reaches 1 at step
    `warmup`, then a cosine decay that would reach --min-lr at step epochs x steps_per_epoch, one past the run's
    last (the values of the LinearLR + CosineAnnealingLR pair this replaced)."""
    total = cfg.epochs * steps_per_epoch
    warmup = max(0, min(cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch), total - 1))
    floor = min(cfg.min_lr, cfg.lr) / cfg.lr if cfg.lr else 0.0
    decay = max(1, total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = min(step - warmup, decay)
        return floor + (1 - floor) * (1 + math.cos(math.pi * t / decay)) / 2

    return factor


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """`lr_factor` on every parameter group's own LR, stepped once per optimizer step over the whole run (so a run
    cut short by --max-steps and resumed follows the same curve)."""
    return lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))


def build_loss(cfg: TrainConfig):
    """timm train.py's choice: soft-target cross-entropy on mixed targets (label smoothing folded into them),
    label-smoothed cross-entropy on labels; --bce-loss: timm's BinaryCrossEntropy on either."""
    if cfg.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if cfg.mixing else cfg.label_smoothing,
                                  target_threshold=cfg.bce_target_thresh, sum_classes=cfg.bce_sum)
    if cfg.mixing:
        return SoftTargetCrossEntropy()
    return lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)


class OptimStep:
    """Calling it runs one optimizer step and returns the loss, detached (still on the device: reading it would
    sync). `model` runs the step (DDP and/or compiled); `raw_model` is the bare module whose gradients are clipped;
    `no_sync` (DDP's) keeps the gradient all-reduce to the last micro-batch of a step; `batch_augment`
    (trainlib.batch_augment) turns each micro-batch's labels into the loss's targets."""

    def __init__(self, *, model, raw_model, optimizer, scheduler, device, amp_dtype, clip_grad: float, loss_fn,
                 batch_augment=None, no_sync=None):
        self.model, self.raw_model, self.optimizer, self.scheduler = model, raw_model, optimizer, scheduler
        self.device, self.amp_dtype, self.clip_grad, self.loss_fn = device, amp_dtype, clip_grad, loss_fn
        self.batch_augment, self.no_sync = batch_augment, no_sync or contextlib.nullcontext
        self.scaler = device.grad_scaler(enabled=amp_dtype == torch.float16)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.accumulate([(images, labels)])

    def accumulate(self, batches) -> torch.Tensor:
        """One optimizer step on the sum of the micro-batches' gradients, each loss weighted 1/len(batches): the
        step of one batch as large as all of them together. Returns their mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for k, (images, labels) in enumerate(batches):
            last = k == len(batches) - 1
            with contextlib.nullcontext() if last else self.no_sync():
                if self.batch_augment is not None:
                    images, labels = self.batch_augment(images, labels)
                with self.device.autocast(self.amp_dtype):
                    loss = self.loss_fn(self.model(images), labels)
                self.scaler.scale(loss / len(batches) if len(batches) > 1 else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total / len(batches) if len(batches) > 1 else total

    @property
    def lr(self) -> float:
        """The peak rate the next step uses (with --layer-decay, the head's; the scheduler moves it after the step)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, schedule_at: int | None = None) -> None:
        """The moments and loss scale of a checkpoint `state`; its LR schedule too when `schedule_at` is None. Else
        the schedule built for this run (another length) is stepped to `schedule_at` from its own start."""
        fresh_lrs = [g["lr"] for g in self.optimizer.param_groups]  # the new schedule's start, before any step
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # another grouping of the parameters: --layer-decay turned on or off
            raise CheckpointError(f"the checkpoint's optimizer does not fit this one ({e}; another --layer-decay "
                                  f"or --model?): start a new run from its weights with --pretrained") from None
        if state["scaler"] and self.scaler.is_enabled():  # resumed under another precision: fp16's scale starts anew
            self.scaler.load_state_dict(state["scaler"])
        if schedule_at is None and "lr_lambdas" not in state["scheduler"]:
            schedule_at = state["scheduler"]["last_epoch"]  # an older checkpoint's schedule object: recomputed
        if schedule_at is None:
            self.scheduler.load_state_dict(state["scheduler"])
            return
        for group, lr in zip(self.optimizer.param_groups, fresh_lrs):
            group["lr"] = lr
        # LambdaLR is closed-form: its LR at a step depends on the step alone, so it is set there directly.
        self.scheduler.last_epoch = schedule_at - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            self.scheduler.step()
