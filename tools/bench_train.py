"""Training-step benchmark: how fast is our step, and how much does real input cost it? One process, one run.

Measures, for one model / batch size / precision / compile setting, three training loops on the same device:
  (a) baseline   timm's model as timm builds it, fused AdamW, autocast, label smoothing, synthetic input
                 (normalized float images already on the device) and `torch.compile` when --compile;
  (b) ours       train.py's own step (`Trainer.step_on`, built by `trainlib.build.build_trainer` from the flags: pixel
                 input with uint8 in, gradient clipping, LR schedule) on synthetic uint8 input on the device;
  (c) ours+data  the same step fed by a real backend (--backend host|dali) from shards (--data_path); --feed
                 (repeatable) measures several backends or settings against the same (b) in the same process;
  (d) ours+fp8   with --fp8: (b) with the blocks' linears in FP8 (model/fp8.py; opt-in, lossy).
  (e) ours+recipe with --recipe: (b) with DeiT's per-step extras (trainlib.bench.steps.RECIPE: mixup 0.8, cutmix
                 1.0, random erasing 0.25 on the device, EMA of the weights).
  (f) ours+dynamic with --dynamic-from S: (b) with the model built at S px and fed --img-size, as in a --min-res
                 epoch below the model's side: timm's dynamic_img_size resamples the position embedding every
                 forward, where (b)'s model was built at --img-size (what a resample once per size change gives).
Each loop runs --warmup steps first (compilation and allocator warm-up: not timed), then --steps timed steps with
one device synchronization before and one after the timed stretch; nothing inside the loop synchronizes, exactly
as in training. Prints one JSON line per loop and a summary line:
  step_speedup = img/s(b) / img/s(a)   -- the goal is >= 1.3 on an H100/H200
  feed_ratio   = img/s(c) / img/s(b)   -- the goal is >= 0.98: input must not slow the step
  input_wait   = share of (c)'s wall time spent blocked waiting for the next batch; max_wait_s is the longest
                 single wait (an epoch boundary, where a backend restarts, shows up here)
  fp8_speedup  = img/s(d) / img/s(a);  fp8_vs_ours = img/s(d) / img/s(b), FP8's own effect
  recipe_cost  = img/s(e) / img/s(b): what mixup + cutmix + erasing + EMA leave of the plain step
  dynamic_cost = img/s(f) / img/s(b): what resampling the position embedding every forward leaves of the step
With --recheck, (b) runs again after everything else: `drift` = its second figure over its first says how steady the
device's clocks were across the run.
Read a ratio only within one run: the loops share the process, the device and its clocks.

  python tools/bench_train.py --data_path SHARDS --backend dali --batch-size 256 --compile --out results.jsonl
  python tools/bench_train.py --data_path SHARDS --compile --fp8 --recheck \
      --feed dali:workers=8 --feed dali:workers=4,name=dali_w4 --feed host:workers=14,data_path=SHARDS320,name=host320
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import torch

from pipeline.backends import BACKENDS, build_loader, get_backend
from pipeline.cli import CommandParser, add_flags, assignments, from_args, knob
from pipeline.bench import endless
from pipeline.loader import timed
from trainlib.devices import resolve_device
from trainlib.bench.steps import StepConfig, baseline_step, our_step, synthetic

FEEDS = tuple(name for name in BACKENDS if get_backend(name).reads_shards)  # what (c) can be fed by


@dataclass
class FeedKeys:
    """--feed's own keys (its other keys are the backend's options); not given: --data_path, --workers, --steps."""

    name: str | None = None  # the loop is ours_NAME; default: the backend's name
    data_path: str | None = None
    workers: int | None = None
    steps: int | None = None
    epochs: int | None = None  # instead of steps: as many steps as this many epochs take (their restarts count)
    aa: str | None = None  # train augmentation of this feed, timm's --aa spec (pipeline/augment.py)

    def validate(self) -> None:
        for key in ("workers", "steps", "epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} takes an integer >= 1, got {value}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("steps or epochs, not both")


@dataclass
class BenchTrainConfig(StepConfig):
    backend: str = knob("none", "(c)'s input; none skips (c)", choices=(*FEEDS, "none"))
    data_path: str | None = knob(None, "shards made by tools/make_shards.py, for (c)", flag="--data_path")
    workers: int = knob(8, "decode processes (host) or threads (dali)")
    warmup: int = knob(20, "untimed steps before each timed stretch")
    steps: int = knob(100, "timed steps per loop")
    loops: str = knob("a,b,c", "which loops to run, comma separated")
    out: str | None = knob(None, "also append the JSON lines to this file")
    feed: list[str] | None = knob(None, "a (c) loop; repeatable. Keys: " + ", ".join(
        f.name for f in dataclasses.fields(FeedKeys)) + ", and the backend's own options (pipeline.host.HostOptions, "
        "pipeline.dali.DaliOptions fields, e.g. hw_decoder_load=1). Unset keys come from "
        "--data_path/--workers. Replaces --backend", metavar="BACKEND[:key=value,...]")
    fp8: bool = knob(False, "also run (d): our step with FP8 linears (model/fp8.py)")
    recipe: bool = knob(False, "also run (e): our step with mixup, cutmix, random erasing and EMA")
    run_id: str | None = knob(None, "tag for this run's lines, so that tools/bench_report.py can tell runs in one "
                                    "file apart", default_help="the start time")
    recheck: bool = knob(False, "run (b) again at the end and report the drift")
    dynamic_from: int = knob(0, "also run (f): our step with the model built at this side and fed --img-size "
                                "(timm's dynamic_img_size, as under train.py's --min-res); 0 = no (f)")


def parse_args(argv=None) -> tuple[BenchTrainConfig, list[dict]]:
    """The config and its (c) loops (`parse_feeds`)."""
    p = CommandParser(description=__doc__.split("\n")[0])
    add_flags(p, BenchTrainConfig)
    args = from_args(BenchTrainConfig, vars(p.parse_args(argv)))
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        args.train_config()  # a value train.py would refuse is a usage error now, not after loop (a)
        feeds = parse_feeds(args) if "c" in args.loops else []
    except ValueError as e:  # ConfigError among them
        p.error(str(e))
    return args, feeds


def parse_feeds(args: BenchTrainConfig) -> list[dict]:
    """--feed specs (or --backend) as dicts with every key set; names unique, each backend given its shards. The
    backend's options (its options class, validated) are in `feed["options"]`; steps/epochs only where given."""
    specs = args.feed or ([args.backend] if args.backend != "none" else [])
    feeds = []
    for spec in specs:
        backend, _, rest = spec.partition(":")
        if backend not in FEEDS:
            raise ValueError(f"--feed {spec!r}: the backend is one of {', '.join(FEEDS)}")
        options_class = get_backend(backend).options_class()
        try:
            keys, options = assignments(rest, FeedKeys, options_class)
            FeedKeys(**keys).validate()
            feed = {"backend": backend, "name": backend, "data_path": args.data_path, "workers": args.workers, **keys,
                    "options": options_class(**options)}
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
    args, feeds = parse_args(argv)
    dev = resolve_device(args.device)
    loops = set(args.loops.split(","))
    meta = {"run": args.run_id or time.strftime("%Y-%m-%dT%H:%M:%S"), "device": dev.name(), "model": args.model,
            "batch_size": args.batch_size, "img_size": args.img_size, "amp": args.amp, "compile": args.compile,
            "backend": args.backend, "torch": torch.__version__}
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
    if "b" in loops or feeds or args.fp8 or args.recipe:
        step = our_step(args, dev)
        if "b" in loops:
            report(run_loop("ours_synthetic", step, synthetic(args, dev, torch.uint8), args, dev))
        for feed in feeds:
            steps = feed.get("steps")
            fields = dict(backend=feed["backend"], workers=feed["workers"], aa=feed.get("aa"),
                          **dataclasses.asdict(feed["options"]))
            try:
                loader = build_loader(data_path=feed["data_path"], split="train", backend=feed["backend"],
                                               batch_size=args.batch_size, device=dev.device,
                                               workers=feed["workers"], img_size=args.img_size, dtype=torch.uint8,
                                               options=feed["options"], aa=feed.get("aa"))
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
        if args.recipe:
            report(run_loop("ours_recipe", our_step(args, dev, recipe=True), synthetic(args, dev, torch.uint8), args,
                            dev))
        if args.dynamic_from:
            report(run_loop("ours_dynamic", our_step(args, dev, model_side=args.dynamic_from),
                            synthetic(args, dev, torch.uint8), args, dev), model_side=args.dynamic_from)
        if args.recheck and "b" in loops:
            report(run_loop("ours_synthetic_end", step, synthetic(args, dev, torch.uint8), args, dev))
        del step  # the trainer and its model go before the summary
    summary = summarize(feeds, results, report)
    summary["failed"] = sorted(name for name, r in results.items() if "error" in r)
    return summary


def summarize(feeds: list[dict], results: dict, report) -> dict:
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
    recipe = results.get("ours_recipe", {}).get("img_s")
    if ours and recipe:
        common["recipe_cost"] = round(recipe / ours["img_s"], 4)
    dynamic = results.get("ours_dynamic", {}).get("img_s")
    if ours and dynamic:
        common["dynamic_cost"] = round(dynamic / ours["img_s"], 4)
    if ours and "ours_synthetic_end" in results:
        common["drift"] = round(results["ours_synthetic_end"]["img_s"] / ours["img_s"], 4)
    summaries = []
    for feed in feeds or [None]:
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
