"""The training steps the benchmarks compare, built once here so that tools/bench_train.py and tools/profile_step.py
measure the same things:
  (a) `baseline_step`: timm's model as timm builds it and the textbook step (fused AdamW, autocast, label smoothing);
  (b) `our_step`: train.py's own `Trainer.step`, built by `trainlib.build` from the flags a user would give train.py.
`setup` is anything with the attributes model, img_size, num_classes, batch_size, amp (bf16/fp16/fp32), compile,
clip_grad and device: the flags `add_step_flags` gives a benchmark's parser.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import pipeline
from pipeline import endless
from trainlib import distributed
from trainlib.build import build_trainer
from trainlib.config import parse_config
from trainlib.devices import AMP_DTYPES
from trainlib.runlog import QuietLog


def add_step_flags(p: argparse.ArgumentParser) -> None:
    """The flags that define the compared steps, the same in every benchmark."""
    p.add_argument("--model", default="vit_base_patch32_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=pipeline.IMAGENET_CLASSES)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile both the baseline and our model")
    p.add_argument("--clip-grad", type=float, default=1.0, help="ours: train.py's --clip-grad")
    p.add_argument("--device", default="auto", help="auto, cuda, npu or cpu (train.py's names)")


def baseline_step(args, dev):
    """(a): timm's model as timm builds it and the textbook step: fused AdamW, autocast, label smoothing, no extras."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
    model.to(dev.device).train()
    kernel = {"fused": True} if dev.kind == "cuda" else {"foreach": True}  # fused AdamW is a CUDA kernel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kernel)
    model = torch.compile(model) if args.compile else model
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


def our_step(args, dev, fp8: bool = False):
    """(b) and (d): train.py's Trainer.step itself, built by trainlib.build from flags a user would give train.py."""
    cfg = parse_config(["--backend", "synthetic", "--device", args.device, "--model", args.model,
                        "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
                        "--num-classes", str(args.num_classes), "--amp", args.amp, "--clip-grad", str(args.clip_grad),
                        "--compile" if args.compile else "--no-compile", "--fp8" if fp8 else "--no-fp8"])
    # A schedule long enough never to wrap within a benchmark; its LR values do not change the step's cost.
    trainer = build_trainer(cfg, dev, distributed.placement(cfg), QuietLog(), steps_per_epoch=10**6,
                            classes=args.num_classes)
    return trainer.step


def synthetic(args, dev, dtype):
    return endless(pipeline.build_loader(backend="synthetic", batch_size=args.batch_size, device=dev.device,
                                         img_size=args.img_size, num_classes=args.num_classes, dtype=dtype))
