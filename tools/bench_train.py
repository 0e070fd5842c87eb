"""Training-step benchmark: how fast is our step, and how much does real input cost it? One process, one run.

Measures, for one model / batch size / precision / compile setting, three training loops on the same device:
  (a) baseline   timm's model as timm builds it, fused AdamW, autocast, label smoothing, synthetic input
                 (normalized float images already on the device) and `torch.compile` when --compile;
  (b) ours       train.py's own step (`Trainer.step`, built by `trainlib.build.build_trainer` from the flags: pixel
                 input with uint8 in, gradient clipping, LR schedule) on synthetic uint8 input on the device;
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
import dataclasses
import json
import sys
import time

import torch

from pipeline.backends import BACKENDS, build_loader, get_backend
from pipeline.loader import endless, timed
from trainlib.devices import resolve_device
from trainlib.steps import add_step_flags, baseline_step, our_step, synthetic


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_flags(p)
    p.add_argument("--backend", choices=(*FEEDS, "none"), default="none",
                   help="(c)'s input; none skips (c)")
    p.add_argument("--data_path", default=None, help="shards made by tools/make_shards.py, for (c)")
    p.add_argument("--workers", type=int, default=8, help="decode processes (host) or threads (dali)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before each timed stretch")
    p.add_argument("--steps", type=int, default=100, help="timed steps per loop")
    p.add_argument("--loops", default="a,b,c", help="which loops to run, comma separated")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--feed", action="append", default=[], metavar="BACKEND[:key=value,...]",
                   help="a (c) loop; repeatable. Keys: " + ", ".join(FEED_VALUES) + ", and the backend's own "
                        "options (pipeline.host.HostOptions, pipeline.dali.DaliOptions fields, e.g. "
                        "hw_decoder_load=1). Unset keys come from --data_path/--workers. Replaces --backend")
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


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError
    return n


FEEDS = tuple(name for name in BACKENDS if get_backend(name).reads_shards)  # what (c) can be fed by
# key: (conversion, what a good value is). A backend's own options are converted by their declared type.
FEED_VALUES = {"name": (str, "a name"), "data_path": (str, "a folder"), "workers": (_positive, "an integer >= 1"),
               "steps": (_positive, "an integer >= 1"), "epochs": (_positive, "an integer >= 1")}
OPTION_VALUES = {"int": (int, "an integer"), "float": (float, "a number"), "str": (str, "a word"),
                 "bool": (lambda v: {"1": True, "0": False}[v], "1 or 0")}


def parse_feeds(args) -> list[dict]:
    """--feed specs (or --backend) as dicts with every key set; names unique, each backend given its shards. A key
    that names a field of the backend's options class goes into `feed["options"]`."""
    specs = args.feed or ([args.backend] if args.backend != "none" else [])
    feeds = []
    for spec in specs:
        backend, _, rest = spec.partition(":")
        if backend not in FEEDS:
            raise ValueError(f"--feed {spec!r}: the backend is one of {', '.join(FEEDS)}")
        option_types = {f.name: f.type for f in dataclasses.fields(get_backend(backend).options_class())
                        if str(f.type) in OPTION_VALUES}  # scalar options (hybrid's nested dali/host keep defaults)
        feed, options = {"backend": backend, "name": backend, "data_path": args.data_path, "workers": args.workers}, {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if key not in FEED_VALUES and key not in option_types or not eq:
                raise ValueError(f"--feed {spec!r}: {item!r} is not key=value with a key in "
                                 f"{', '.join([*FEED_VALUES, *option_types])}")
            convert, good = FEED_VALUES[key] if key in FEED_VALUES else OPTION_VALUES[str(option_types[key])]
            try:
                (feed if key in FEED_VALUES else options)[key] = convert(value)
            except (ValueError, KeyError):
                raise ValueError(f"--feed {spec!r}: {key} takes {good}, got {value!r}") from None
        if "steps" in feed and "epochs" in feed:
            raise ValueError(f"--feed {spec!r}: steps or epochs, not both")
        try:
            feed["options"] = get_backend(backend).options_class()(**options)
            feed["options"].validate()
        except ValueError as e:
            raise ValueError(f"--feed {spec!r}: {e}") from None
        if not feed["data_path"]:
            raise ValueError(f"--backend/--feed {backend} needs --data_path (or data_path= in --feed)")
        feeds.append(feed)
    names = [f["name"] for f in feeds]
    if len(set(names)) != len(names):
        raise ValueError(f"--feed names must differ (name=...): {names}")
    return feeds


def run_loop(name: str, step, batches, args, dev, steps: int | None = None) -> dict:
    """Warm up, then time `steps` (--steps) steps. `batches` is an iterator; time blocked in next() is input wait."""
    steps = steps or args.steps
    for _ in range(args.warmup):
        step(*next(batches))
    dev.synchronize()  # timed stretch starts with an idle device
    waits, t0 = [], time.perf_counter()
    for _, ((images, labels), wait_s) in zip(range(steps), timed(batches)):
        waits.append(wait_s)
        step(images, labels)
    dev.synchronize()  # ...and ends when the device has finished the last step
    elapsed = time.perf_counter() - t0
    out = {"loop": name, "img_s": round(steps * args.batch_size / elapsed, 2), "steps": steps,
           "input_wait": round(sum(waits) / elapsed, 4), "max_wait_s": round(max(waits), 4),
           "seconds": round(elapsed, 3)}
    if dev.kind != "cpu":
        out["max_mem_gib"] = round(dev.max_memory_allocated() / 2**30, 2)
        dev.reset_peak_memory()
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = resolve_device(args.device)
    loops = set(args.loops.split(","))
    meta = {"run": args.run_id or time.strftime("%Y-%m-%dT%H:%M:%S"), "device": dev.name(), "model": args.model,
            "batch_size": args.batch_size, "amp": args.amp, "compile": args.compile, "backend": args.backend,
            "torch": torch.__version__}
    results = {}

    def report(r, **fields):
        line = json.dumps({**meta, **fields, **r})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        results[r["loop"]] = r

    if "a" in loops:
        report(run_loop("baseline", baseline_step(args, dev), synthetic(args, dev, torch.float32), args, dev))
    if "b" in loops or args.feeds or args.fp8:
        step = our_step(args, dev)
        if "b" in loops:
            report(run_loop("ours_synthetic", step, synthetic(args, dev, torch.uint8), args, dev))
        for feed in args.feeds:
            steps = feed.get("steps")
            fields = dict(backend=feed["backend"], workers=feed["workers"], **dataclasses.asdict(feed["options"]))
            try:
                loader = build_loader(data_path=feed["data_path"], split="train", backend=feed["backend"],
                                               batch_size=args.batch_size, device=dev.device,
                                               workers=feed["workers"], img_size=args.img_size, dtype=torch.uint8,
                                               options=feed["options"])
                if "epochs" in feed:  # timed steps spanning that many epochs, so the restarts between them count
                    steps = feed["epochs"] * len(loader)
                try:
                    report(run_loop(f"ours_{feed['name']}", step, endless(loader), args, dev, steps),
                           steps_per_epoch=len(loader), **fields)
                finally:
                    loader.close()
            except Exception as e:  # one feed failing (a missing library, no shared memory) must not end the run
                report({"loop": f"ours_{feed['name']}", "error": f"{type(e).__name__}: {e}"}, **fields)
        if args.fp8:  # before the recheck, so that the drift figure spans it too
            try:
                report(run_loop("ours_fp8", our_step(args, dev, fp8=True), synthetic(args, dev, torch.uint8), args,
                                dev))
            except Exception as e:  # e.g. a GPU older than FP8 matmuls: reported, the recheck still runs
                report({"loop": "ours_fp8", "error": f"{type(e).__name__}: {e}"})
        if args.recheck and "b" in loops:
            report(run_loop("ours_synthetic_end", step, synthetic(args, dev, torch.uint8), args, dev))
        del step  # the trainer and its model go before the summary
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
