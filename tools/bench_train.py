"""Training-step benchmark: how fast is our step, and how much does real input cost it? One process, one run.

Measures, for one model / batch size / precision / compile setting, three training loops on the same device:
  (a) baseline   timm's model as timm builds it, fused AdamW, autocast, label smoothing, synthetic input
                 (normalized float images already on the device) and `torch.compile` when --compile;
  (b) ours       train.py's step (model/fused.py pixel input: uint8 in; gradient clipping, LR schedule) on
                 synthetic uint8 input already on the device;
  (c) ours+data  the same step fed by a real backend (--backend host|dali) from shards (--data_path); --feed
                 (repeatable) measures several backends or settings against the same (b) in the same process;
  (d) ours+fp8   with --fp8: (b) with the blocks' linears in FP8 (model/fp8.py; opt-in, lossy).
Each loop runs --warmup steps first (compilation and allocator warm-up: not timed), then --steps timed steps with
one device synchronization before and one after the timed stretch; nothing inside the loop synchronizes, exactly
as in training. Prints one JSON line per loop and a summary line:
  step_speedup = img/s(b) / img/s(a)   -- the goal is >= 1.3 on an H100/H200
  feed_ratio   = img/s(c) / img/s(b)   -- the goal is >= 0.98: input must not slow the step
  input_wait   = share of (c)'s wall time spent blocked waiting for the next batch; max_wait_s is the longest
                 single wait (an epoch boundary, where a backend restarts, shows up here)
  fp8_speedup  = img/s(d) / img/s(a);  fp8_vs_ours = img/s(d) / img/s(b), FP8's own effect
With --recheck, (b) runs again after everything else: `drift` = its second figure over its first says how steady the
device's clocks were across the run.
Read a ratio only within one run: the loops share the process, the device and its clocks.

  python tools/bench_train.py --data_path SHARDS --backend dali --batch-size 256 --compile --out results.jsonl
  python tools/bench_train.py --data_path SHARDS --compile --fp8 --recheck \
      --feed dali:workers=8 --feed dali:workers=4,name=dali_w4 --feed host:workers=14,data_path=SHARDS320,name=host320
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
from model.fp8 import use_fp8  # noqa: E402
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
    p.add_argument("--feed", action="append", default=[], metavar="BACKEND[:key=value,...]",
                   help="a (c) loop; repeatable. Keys: " + ", ".join(FEED_KEYS) + ". Unset keys come from "
                        "--data_path/--workers. Replaces --backend")
    p.add_argument("--fp8", action="store_true", help="also run (d): our step with FP8 linears (model/fp8.py)")
    p.add_argument("--run-id", default=None, help="tag for this run's lines (default: the start time), so that "
                                                  "tools/bench_report.py can tell runs in one file apart")
    p.add_argument("--recheck", action="store_true", help="run (b) again at the end and report the drift")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        args.feeds = parse_feeds(args) if "c" in args.loops else []
    except ValueError as e:
        p.error(str(e))
    return args


FEED_KEYS = ("name", "data_path", "workers", "steps", "epochs", "hw_decoder_load", "prebuild")
DALI_EXTRAS = ("hw_decoder_load", "prebuild")  # spec.extra of the dali backend


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError
    return n


def _share(value: str) -> float:
    x = float(value)
    if not 0.0 <= x <= 1.0:
        raise ValueError
    return x


# key: (conversion, what a good value is)
FEED_VALUES = {"name": (str, "a name"), "data_path": (str, "a folder"), "workers": (_positive, "an integer >= 1"),
               "steps": (_positive, "an integer >= 1"), "epochs": (_positive, "an integer >= 1"),
               "hw_decoder_load": (_share, "a number in [0, 1]"), "prebuild": (lambda v: {"1": True, "0": False}[v],
                                                                               "1 or 0")}


def parse_feeds(args) -> list[dict]:
    """--feed specs (or --backend) as dicts with every key set; names unique, each backend given its shards."""
    specs = args.feed or ([args.backend] if args.backend != "none" else [])
    feeds = []
    for spec in specs:
        backend, _, rest = spec.partition(":")
        if backend not in ("host", "dali"):
            raise ValueError(f"--feed {spec!r}: the backend is host or dali")
        feed = {"backend": backend, "name": backend, "data_path": args.data_path, "workers": args.workers}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if key not in FEED_KEYS or not eq:
                raise ValueError(f"--feed {spec!r}: {item!r} is not key=value with a key in {', '.join(FEED_KEYS)}")
            if key in DALI_EXTRAS and backend != "dali":
                raise ValueError(f"--feed {spec!r}: {key} is a dali option")
            convert, good = FEED_VALUES[key]
            try:
                feed[key] = convert(value)
            except (ValueError, KeyError):
                raise ValueError(f"--feed {spec!r}: {key} takes {good}, got {value!r}") from None
        if "steps" in feed and "epochs" in feed:
            raise ValueError(f"--feed {spec!r}: steps or epochs, not both")
        if not feed["data_path"]:
            raise ValueError(f"--backend/--feed {backend} needs --data_path (or data_path= in --feed)")
        feeds.append(feed)
    names = [f["name"] for f in feeds]
    if len(set(names)) != len(names):
        raise ValueError(f"--feed names must differ (name=...): {names}")
    return feeds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def build(args, ours: bool, fp8: bool = False):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size,
                              **json.loads(args.model_kwargs))
    if ours:
        model = use_pixel_input(model, MEAN, STD)
    if fp8:
        use_fp8(model)
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


def run_loop(name: str, step, batches, args, steps: int | None = None) -> dict:
    """Warm up, then time `steps` (--steps) steps. `batches` is an iterator; time blocked in next() is input wait."""
    steps = steps or args.steps
    for _ in range(args.warmup):
        step(*next(batches))
    synchronize(args.device)  # timed stretch starts with an idle device
    waits, t0 = [], time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        images, labels = next(batches)
        waits.append(time.perf_counter() - t)
        step(images, labels)
    synchronize(args.device)  # ...and ends when the device has finished the last step
    elapsed = time.perf_counter() - t0
    out = {"loop": name, "img_s": round(steps * args.batch_size / elapsed, 2), "steps": steps,
           "input_wait": round(sum(waits) / elapsed, 4), "max_wait_s": round(max(waits), 4),
           "seconds": round(elapsed, 3)}
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
    meta = {"run": args.run_id or time.strftime("%Y-%m-%dT%H:%M:%S"),
            "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor()
            or args.device.type, "model": args.model, "batch_size": args.batch_size, "amp": args.amp,
            "compile": args.compile, "backend": args.backend, "torch": torch.__version__}
    results = {}

    def report(r, **fields):
        line = json.dumps({**meta, **fields, **r})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        results[r["loop"]] = r

    if "a" in loops:
        model, opt = build(args, ours=False)
        report(run_loop("baseline", make_step(model, opt, args, ours=False), synthetic(args, torch.float32), args))
        del model, opt
    if "b" in loops or args.feeds or args.fp8:
        model, opt = build(args, ours=True)
        step = make_step(model, opt, args, ours=True)
        if "b" in loops:
            report(run_loop("ours_synthetic", step, synthetic(args, torch.uint8), args))
        for feed in args.feeds:
            extra = {key: feed[key] for key in DALI_EXTRAS if key in feed}
            steps = feed.get("steps")
            fields = dict(backend=feed["backend"], workers=feed["workers"], **extra)
            try:
                loader = pipeline.build_loader(data_path=feed["data_path"], split="train", backend=feed["backend"],
                                               batch_size=args.batch_size, device=args.device,
                                               workers=feed["workers"], img_size=args.img_size, dtype=torch.uint8,
                                               extra=extra)
                if "epochs" in feed:  # timed steps spanning that many epochs, so the restarts between them count
                    steps = feed["epochs"] * len(loader)
                try:
                    report(run_loop(f"ours_{feed['name']}", step, endless(loader), args, steps),
                           steps_per_epoch=len(loader), **fields)
                finally:
                    loader.close()
            except Exception as e:  # one feed failing (a missing library, no shared memory) must not end the run
                report({"loop": f"ours_{feed['name']}", "error": f"{type(e).__name__}: {e}"}, **fields)
        if args.fp8:  # before the recheck, so that the drift figure spans it too
            try:
                fp8_model, fp8_opt = build(args, ours=True, fp8=True)
                report(run_loop("ours_fp8", make_step(fp8_model, fp8_opt, args, ours=True),
                                synthetic(args, torch.uint8), args))
                del fp8_model, fp8_opt
            except Exception as e:
                report({"loop": "ours_fp8", "error": f"{type(e).__name__}: {e}"})
        if args.recheck and "b" in loops:
            report(run_loop("ours_synthetic_end", step, synthetic(args, torch.uint8), args))
        del model, opt, step
    summary = summarize(args, results, report)
    summary["failed"] = sorted(name for name, r in results.items() if "error" in r)
    return summary


def summarize(args, results: dict, report) -> dict:
    """One summary line per feed (or one without a feed): the ratios, each from figures of this run."""
    base, ours = results.get("baseline"), results.get("ours_synthetic")
    common = {}
    if base and ours:
        common["step_speedup"] = round(ours["img_s"] / base["img_s"], 4)
    fp8 = results.get("ours_fp8", {}).get("img_s")
    if base and fp8:
        common["fp8_speedup"] = round(fp8 / base["img_s"], 4)
    if ours and fp8:
        common["fp8_vs_ours"] = round(fp8 / ours["img_s"], 4)  # FP8's own effect, without (b)'s extra work
    if ours and "ours_synthetic_end" in results:
        common["drift"] = round(results["ours_synthetic_end"]["img_s"] / ours["img_s"], 4)
    summaries = []
    for feed in args.feeds or [None]:
        summary = {"loop": "summary", **common}
        real = results.get(f"ours_{feed['name']}") if feed else None
        if feed:
            summary.update(backend=feed["backend"], feed=feed["name"])
        if real and ours and "img_s" in real:
            summary.update(feed_ratio=round(real["img_s"] / ours["img_s"], 4), input_wait=real["input_wait"],
                           max_wait_s=real["max_wait_s"])
        report(summary)
        summaries.append(summary)
    return summaries[0]


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)  # a loop that failed was reported; the exit status says so too
