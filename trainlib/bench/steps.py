"""The training steps the benchmarks compare, built once here so that tools/bench_train.py and tools/profile_step.py
measure the same things:
  (a) `baseline_step`: timm's model as timm builds it and the textbook step (fused AdamW, autocast, label smoothing);
  (b) `our_step`: train.py's own step (`Trainer.step_on`), built by `trainlib.build` from the TrainConfig of the same
      flags.
Both take a `StepConfig` (a benchmark's config subclasses it, so its parser carries these flags: pipeline/cli.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pipeline
from pipeline.bench import endless
from pipeline.cli import knob
from trainlib import distributed
from trainlib.build import build_trainer
from trainlib.config import TrainConfig
from trainlib.devices import AMP_DTYPES
from trainlib.runlog import QuietLog


# DeiT's per-step extras (recipes/deit.yaml): what (e) adds to (b).
RECIPE = dict(mixup=0.8, cutmix=1.0, reprob=0.25, remode="pixel", model_ema=True, model_ema_decay=0.99996)


@dataclass
class StepConfig:
    """The flags that define the compared steps, the same in every benchmark."""

    model: str = knob("vit_base_patch32_224", "timm model name (built with pretrained=False)")
    img_size: int = knob(224, "input resolution")
    num_classes: int = knob(pipeline.IMAGENET_CLASSES, "classifier width")
    batch_size: int = knob(256, "images per step")
    amp: str = knob("bf16", "precision of both steps", choices=("bf16", "fp16", "fp32"))
    compile: bool = knob(False, "torch.compile both the baseline and our model")
    clip_grad: float = knob(1.0, "ours: train.py's --clip-grad")
    device: str = knob("auto", "auto, cuda, npu or cpu (train.py's names)")

    def train_config(self, fp8: bool = False, recipe: bool = False, model_side: int = 0) -> TrainConfig:
        """train.py's validated config of (b) (with fp8: (d); with recipe: (e), `RECIPE`'s batch augmentation and
        EMA; with model_side: (f), the model built at that side and trained at img_size, epoch 0 of a --min-res
        schedule, so timm's dynamic_img_size resamples its position embedding every forward) on synthetic input;
        ConfigError names a bad flag."""
        sides = dict(img_size=model_side, min_res=self.img_size, start_ramp=1, end_ramp=2) if model_side else \
            dict(img_size=self.img_size)
        cfg = TrainConfig(backend="synthetic", device=self.device, model=self.model, **sides,
                          batch_size=self.batch_size, num_classes=self.num_classes, amp=self.amp,
                          clip_grad=self.clip_grad, compile=self.compile, fp8=fp8, **(RECIPE if recipe else {}))
        cfg.validate()
        return cfg


def baseline_step(args: StepConfig, dev):
    """(a): timm's model as timm builds it and the textbook step: fused AdamW, autocast, label smoothing, no extras."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
    model.to(dev.device).train()
    kernel = {"fused": True} if dev.kind == "cuda" else {"foreach": True}  # fused AdamW is a CUDA kernel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kernel)
    model = torch.compile(model, backend=dev.compile_backend()) if args.compile else model  # inductor; npu: TorchAir
    dtype = AMP_DTYPES[args.amp]
    scaler = dev.grad_scaler(enabled=dtype == torch.float16)

    def step(images, labels):
        with dev.autocast(dtype):
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def our_step(args: StepConfig, dev, fp8: bool = False, recipe: bool = False, model_side: int = 0):
    """(b), (d), (e) and (f): train.py's Trainer.step_on itself, built by trainlib.build from train.py's config of
    these flags."""
    cfg = args.train_config(fp8, recipe, model_side)
    # A schedule long enough never to wrap within a benchmark; its LR values do not change the step's cost.
    trainer = build_trainer(cfg, dev, distributed.placement(cfg), QuietLog(), steps_per_epoch=10**6,
                            classes=args.num_classes)

    def step(images, labels):
        return trainer.step_on([(images, labels)])  # one optimizer step, as train.py's loop takes it

    return step


def synthetic(args: StepConfig, dev, dtype):
    return endless(pipeline.build_loader(backend="synthetic", batch_size=args.batch_size, device=dev.device,
                                         img_size=args.img_size, num_classes=args.num_classes, dtype=dtype))
