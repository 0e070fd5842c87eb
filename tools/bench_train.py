"""Training-step benchmark: how fast is our step, and how much does real input cost it? One process, one run.

Measures, for one model / batch size / precision / compile setting, three training loops on the same device:
  (a) baseline   timm's model as timm builds it, fused AdamW, autocast, label smoothing, synthetic input
                 (normalized float images already on the device) and `torch.compile` when --compile;
  (b) ours       train.py's step (model/fused.py pixel input: uint8 in; gradient clipping, LR schedule) on
                 synthetic uint8 input already on the device;
  (c) ours+data  the same step fed by a real backend (--backend host|dali) from shards (--data_path).
Each loop runs --warmup steps first (compilation and allocator warm-up: not timed), then --steps timed steps with
one device synchronization before and one after the timed stretch; nothing inside the loop synchronizes, exactly
as in training. Prints one JSON line per loop and a summary line:
  step_speedup = img/s(b) / img/s(a)   -- the goal is >= 1.3 on an H100/H200
  feed_ratio   = img/s(c) / img/s(b)   -- the goal is >= 0.98: input must not slow the step
  input_wait   = share of (c)'s wall time spent blocked waiting for the next batch
Read a ratio only within one run: the loops share the process, the device and its clocks.

  python tools/bench_train.py --data_path SHARDS --backend dali --batch-size 256 --compile --out results.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402
from pipeline.contract import endless  # noqa: E402
from model.fused import use_pixel_input  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch32_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile both the baseline and our model")
    p.add_argument("--clip-grad", type=float, default=1.0, help="ours: clip the gradient norm, as train.py does")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for ours, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--backend", choices=("host", "dali", "none"), default="none", help="(c)'s input; none skips (c)")
    p.add_argument("--data_path", default=None, help="shards made by tools/make_shards.py, for (c)")
    p.add_argument("--workers", type=int, default=8, help="decode processes (host) or threads (dali)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before each timed stretch")
    p.add_argument("--steps", type=int, default=100, help="timed steps per loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loops", default="a,b,c", help="which loops to run, comma separated")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--model-kwargs", default="{}", help="JSON of extra timm.create_model kwargs (tests: tiny ViTs)")
    args = p.parse_args(argv)
    if "c" in args.loops and args.backend != "none" and not args.data_path:
        p.error("--backend host|dali needs --data_path")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def build(args, ours: bool):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size,
                              **json.loads(args.model_kwargs))
    if ours:
        model = use_pixel_input(model, MEAN, STD)
    model.to(args.device).train()
    fused = args.device.type == "cuda"  # fused AdamW is a CUDA kernel; elsewhere the foreach path
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused or None)
    if args.compile:
        model = torch.compile(model, mode=args.compile_mode if ours else None)
    return model, opt


def make_step(model, opt, args, ours: bool):
    """The baseline's step is the textbook one; ours is what train.py's Trainer.step runs (gradient clipping and a
    per-step LR schedule on top), so step_speedup is net of everything the trainer does."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
    autocast = torch.autocast(args.device.type, dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp == "fp16")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0) if ours else None
    params = [p for group in opt.param_groups for p in group["params"]]

    def step(images, labels):
        with autocast:
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if ours and args.clip_grad:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        scaler.step(opt)
        scaler.update()
        if schedule is not None:
            schedule.step()
        return loss

    return step


def run_loop(name: str, step, batches, args) -> dict:
    """Warm up, then time --steps steps. `batches` is an iterator; time blocked in next() counts as input wait."""
    for _ in range(args.warmup):
        step(*next(batches))
    synchronize(args.device)  # timed stretch starts with an idle device
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        images, labels = next(batches)
        wait += time.perf_counter() - t
        step(images, labels)
    synchronize(args.device)  # ...and ends when the device has finished the last step
    elapsed = time.perf_counter() - t0
    out = {"loop": name, "img_s": round(args.steps * args.batch_size / elapsed, 2),
           "input_wait": round(wait / elapsed, 4), "seconds": round(elapsed, 3)}
    if args.device.type == "cuda":
        out["max_mem_gib"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(args.device)
    return out


def synthetic(args, dtype):
    return endless(pipeline.build_loader(backend="synthetic", batch_size=args.batch_size, device=args.device,
                                         img_size=args.img_size, num_classes=args.num_classes, dtype=dtype))


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.device = torch.device(args.device)
    loops = set(args.loops.split(","))
    meta = {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor()
            or args.device.type, "model": args.model, "batch_size": args.batch_size, "amp": args.amp,
            "compile": args.compile, "backend": args.backend, "torch": torch.__version__}
    results = {}

    def report(r):
        line = json.dumps({**meta, **r})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        results[r["loop"]] = r

    if "a" in loops:
        model, opt = build(args, ours=False)
        report(run_loop("baseline", make_step(model, opt, args, ours=False), synthetic(args, torch.float32), args))
        del model, opt
    if "b" in loops or "c" in loops:
        model, opt = build(args, ours=True)
        step = make_step(model, opt, args, ours=True)
        if "b" in loops:
            report(run_loop("ours_synthetic", step, synthetic(args, torch.uint8), args))
        if "c" in loops and args.backend != "none":
            loader = pipeline.build_loader(data_path=args.data_path, split="train", backend=args.backend,
                                           batch_size=args.batch_size, device=args.device, workers=args.workers,
                                           img_size=args.img_size, dtype=torch.uint8)
            try:
                report(run_loop(f"ours_{args.backend}", step, endless(loader), args))
            finally:
                loader.close()
    summary = {"loop": "summary"}
    if "baseline" in results and "ours_synthetic" in results:
        summary["step_speedup"] = round(results["ours_synthetic"]["img_s"] / results["baseline"]["img_s"], 4)
    real = results.get(f"ours_{args.backend}")
    if real and "ours_synthetic" in results:
        summary["feed_ratio"] = round(real["img_s"] / results["ours_synthetic"]["img_s"], 4)
        summary["input_wait"] = real["input_wait"]
    report(summary)
    return summary


if __name__ == "__main__":
    main()
