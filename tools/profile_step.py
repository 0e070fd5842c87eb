"""Where a training step's time goes: (a) timm's model + the textbook step and (b) train.py's own step, profiled with
torch.profiler on synthetic input, their kernel time sorted into categories.

    python tools/profile_step.py --batch-size 256 --compile --out docs/results/profile-h100.json     # on a GPU
    python tools/profile_step.py --model test_vit --img-size 32 --batch-size 8 --device cpu --out /tmp/p.json

What it measures: per loop, --warmup untimed steps, then --steps steps under the profiler, with one device
synchronization before and after (none inside). `step_ms` is wall time per step. `categories_ms` splits the time
the device's kernels ran (on a GPU: CUDA kernel time; on the CPU: the self time of the operators) into gemm,
attention, norm_elementwise (incl. torch.compile's fused Triton kernels), optimizer, copies and other, per step;
`idle_ms` is step time the kernels did not fill (launch gaps, host work, waiting), on a GPU only. Kernels that
overlap (several streams) are counted each, so the categories can sum above the step time there.
How to read it: the categories say what a faster step would have to shrink; compare (a) and (b) category by
category. Names are matched by substring (`CATEGORIES`, first match wins), so the split is approximate, and a kernel
name a new torch or cuBLAS version introduces may land in `other`: the JSON lists the largest kernels of each loop.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.cli import CommandParser, add_flags, from_args, knob
from trainlib.config import ConfigError
from trainlib.devices import resolve_device
from trainlib.bench.steps import StepConfig, baseline_step, our_step, synthetic

# (category, substrings of kernel or operator names), matched in this order against the lower-cased name.
CATEGORIES = (
    ("attention", ("flash", "fmha", "scaled_dot_product", "efficient_attention", "attention")),
    ("optimizer", ("adam", "sgd", "multi_tensor", "foreach", "clip_grad", "_amp_foreach", "unscale")),
    ("gemm", ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "cutlass", "xmma",
              "cublas", "sm80_", "sm90_", "scaled_mm", "aten::convolution", "conv")),
    ("copies", ("copy", "memcpy", "memset", "aten::cat", "contiguous", "aten::to", "transpose", "permute")),
    ("norm_elementwise", ("triton", "norm", "gelu", "softmax", "elementwise", "vectorized", "reduce", "aten::add",
                          "aten::mul", "aten::div", "aten::sub", "dropout", "aten::sum", "aten::mean", "fill")),
)


def category(name: str) -> str:
    lower = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in lower for k in keys)), "other")


@dataclass
class ProfileConfig(StepConfig):
    warmup: int = knob(10, "untimed steps first (compilation, allocator)")
    steps: int = knob(10, "profiled steps per loop")
    top: int = knob(12, "largest kernels listed per loop")
    out: str | None = knob(None, "write the JSON here too")


def parse_args(argv=None) -> ProfileConfig:
    p = CommandParser(description=__doc__.split("\n\n")[0])
    add_flags(p, ProfileConfig)
    args = from_args(ProfileConfig, vars(p.parse_args(argv)))
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    try:
        args.train_config()  # a value train.py would refuse is a usage error now, not after loop (a)
    except ConfigError as e:
        p.error(str(e))
    return args


def profile_loop(name: str, step, batches, args, dev) -> dict:
    for _ in range(args.warmup):
        step(*next(batches))
    on_gpu = dev.kind == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    dev.synchronize()  # sync point: the profiled stretch starts with an idle device
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(*next(batches))
        dev.synchronize()  # sync point: ...and ends when the device has finished
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        us = evt.self_device_time_total if on_gpu else evt.self_cpu_time_total
        if us > 0 and (on_gpu or evt.key.startswith("aten::")):
            kernels[evt.key] = kernels.get(evt.key, 0.0) + us / 1000 / args.steps
    per_category = {cat: 0.0 for cat, _ in CATEGORIES} | {"other": 0.0}
    for kernel, ms in kernels.items():
        per_category[category(kernel)] += ms
    step_ms = 1000 * wall / args.steps
    out = {"loop": name, "device": dev.name(), "batch_size": args.batch_size, "compile": args.compile,
           "amp": args.amp, "step_ms": round(step_ms, 3), "img_s": round(args.batch_size / wall * args.steps, 1),
           "categories_ms": {k: round(v, 3) for k, v in per_category.items()},
           "top_kernels_ms": {k: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]}}
    if on_gpu:
        out["idle_ms"] = round(max(0.0, step_ms - sum(per_category.values())), 3)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = resolve_device(args.device)
    results = [profile_loop("baseline", baseline_step(args, dev), synthetic(args, dev, torch.float32), args, dev),
               profile_loop("ours", our_step(args, dev), synthetic(args, dev, torch.uint8), args, dev)]
    for r in results:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
