"""Throughput-only input benchmark: how many images per second a backend delivers to the device, nothing else.

    python -m pipeline.bench --data_path SHARDS --backend host --batch-size 256 --workers 16 --seconds 60 \
        [--split train] [--device cpu|cuda|npu] [--baseline IMAGEFOLDER] [--model vit_base_patch32_224]
    python -m pipeline.bench --data_path SHARDS --decode-only [--baseline x] --seconds 10   # one-core decode path

What it measures: wall-clock images per second of fully formed batches (decoded, cropped, flipped, on the device,
normalized as the loader promises), after `--warmup` batches that are not counted (worker start-up, first reads).
The loop does nothing with a batch unless `--model` is given, so the figure is the pipeline's ceiling on this
machine; with `--model NAME` every batch also goes through a forward+backward+SGD step of that timm model, and the
figure is what the pipeline sustains while feeding a real step.

How to read it: one JSON line per `--interval` seconds (progress bar on stderr), then a last line with `"final": true`
holding `img_s` for the whole measured span. `img_s_per_worker` divides by `--workers` (compare it with a one-core
decode micro-benchmark to see scaling). `mb_s` is compressed bytes read from the shards. `data_wait` is the share of
wall time the loop spent waiting for the next batch: near 1 without `--model` (the loop has nothing else to do),
and the fraction of step time lost to input with it. `batch_wait_s` is the mean wait for a batch inside an epoch,
`boundary_wait_s` the longest wait for an epoch's first batch (`epoch_starts` in the span): with a consumer
slower than the pipeline (`--model`, or `--step-ms` for a stand-in step) a loader that runs on across epochs keeps
it near `batch_wait_s`; one that restarts at each epoch (`--epoch-stride 2` forces that) pays its start-up there.
`--baseline SRC` runs a stock torchvision ImageFolder + DataLoader on the source ImageFolder with the same workers,
batch size and seconds right after (with --aa or --color-jitter: timm's create_transform), and adds
`baseline_img_s` and `ratio` (backend / baseline), or `baseline_error` (its last line) where the baseline fails.
`img_per_cpu_s` divides images by the CPU seconds that this process and all its descendants used (Linux), and
`cpu_cores` is how many cores they kept busy: the per-core efficiency, which unlike img/s holds up on a machine
shared with other jobs; with --baseline, `cpu_ratio` compares it (the figure to read on a shared or small box;
the ratio of img/s is the one that counts on a dedicated host). Val padding samples (label -1) are not counted as
images. Device work is synchronized only at reporting boundaries. On `--device cpu` without `--model` the main
process runs torch with one thread (see run()).
`first_batch_s` is the time from building the loader to its first batch (worker or reader processes started, first
reads and decodes), and `workers_pss_mb` the memory of this process's child processes at that moment (proportional
set size, Linux: shared pages counted once): what a loader costs before it delivers anything, paid again at every
restart.
`--decode-only` times the host worker's decode function alone on one core in this process (samples preloaded, so
neither disk nor processes count), and with `--baseline` (any value) the torchvision transform on the same bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.backends import build_loader, get_backend
from pipeline.bench import endless
from pipeline.bench.memory import tree_cpu_seconds, workers_pss_mb
from pipeline.cli import CommandParser, add_flags, from_args, knob
from pipeline.config import DataConfig, loader_args
from pipeline.loader import IMAGENET_CLASSES, LoaderSpec, timed
from pipeline.resolution import ResSchedule
from pipeline.shards.errors import PipelineError
from pipeline.shards.format import ShardSet, open_shard_set

DTYPES = ("float32", "bfloat16", "float16", "uint8")  # what a loader yields (pipeline/loader.py): normalized or raw


@dataclass
class BenchConfig(DataConfig):
    """The data and loader knobs are train.py's (pipeline/config.py `DataConfig`); the benchmark's own follow."""

    split: str = knob("train", 'train (random crops) or val (center crops)', choices=("train", "val"))
    batch_size: int = knob(256, 'per rank')
    seconds: float = knob(30.0, 'measured span, after warm-up')
    warmup: int = knob(5, 'batches consumed before the clock starts')
    interval: float = knob(5.0, 'seconds between JSON lines')
    device: str = knob("cpu", 'cpu | cuda | npu (npu imports torch_npu)')
    patch: int = knob(32, "the model's patch side (ViT-B/32: 32): a --min-res schedule's sides are multiples of it, "
                          "as train.py's are of its model's")
    dtype: str = knob("float32", 'the batches\' dtype; uint8: raw pixels, not normalized', choices=DTYPES)
    prefetch: int = knob(2, 'batches in flight ahead of the loop')
    seed: int = knob(0, 'shuffle and crop seed')
    baseline: str | None = knob(None, 'ImageFolder root (holding train/ and val/): also time torchvision on it')
    model: str | None = knob(None, 'timm model name: also run forward+backward on each batch')
    decode_only: bool = knob(False, "time the host worker's decode path in this process on one core, no loader")
    step_ms: float = knob(0.0, "without --model: a stand-in step that sleeps this long per batch, so the pipeline "
                               "can run ahead (and boundary_wait_s shows whether it does across epoch boundaries)")
    epoch_stride: int = knob(1, "epochs go 0, stride, 2*stride, ...: 2 makes each epoch a jump, so the loader "
                                "restarts at every epoch start (what running on saves)")


def build_parser() -> argparse.ArgumentParser:
    """Flags come from BenchConfig's fields, so the two cannot drift; `--batch-size` and `--batch_size` both work."""
    p = CommandParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    add_flags(p, BenchConfig, underscores=True)
    return p


def sync(device: torch.device) -> None:
    api = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(api, "synchronize"):
        api.synchronize(device)


def model_step(cfg: BenchConfig, num_classes: int, device: torch.device):
    """A plain forward+backward+SGD step of a timm model, or a do-nothing step."""
    if cfg.model is None:
        return (lambda images, labels: time.sleep(cfg.step_ms / 1000)) if cfg.step_ms else (lambda images, labels: None)
    if cfg.dtype == "uint8":
        raise ValueError("--model needs normalized input; drop --dtype uint8")
    import timm

    model = timm.create_model(cfg.model, num_classes=num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(images, labels):
        loss = torch.nn.functional.cross_entropy(model(images.float()), labels, ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(loader, cfg: BenchConfig, device: torch.device, step, label: str, built_at: float) -> dict:
    """Run `loader` (epochs back to back) for cfg.seconds after warm-up; print interval lines; return the totals, with
    the time from `built_at` (before the loader was built) to its first batch."""
    started = {}
    batches, steps = noting_the_first(endless(loader, cfg.epoch_stride), built_at, started), len(loader)
    for _ in range(cfg.warmup):
        step(*next(batches))
    sync(device)  # sync point: the clock starts with no warm-up work still queued on the device
    start = mark = time.perf_counter()
    total = fresh_counts(loader, device)
    interval = fresh_counts(loader, device)
    bar = tqdm(unit="img", unit_scale=True, desc=label, file=sys.stderr, mininterval=1.0)
    for k, ((images, labels), waited) in enumerate(timed(batches), start=cfg.warmup):
        step(images, labels)
        n = labels.shape[0]
        padding = (labels < 0).sum()  # val padding is not an image; summed on the device, read at sync points
        first_of_epoch = k % steps == 0
        for acc in (total, interval):
            acc["images"] += n
            acc["padding"] += padding
            acc["wait"] += waited
            if first_of_epoch:
                acc["boundaries"] += 1
                acc["boundary_wait"] = max(acc["boundary_wait"], waited)
            else:
                acc["batch_waits"] += 1
                acc["batch_wait"] += waited
        bar.update(n)
        now = time.perf_counter()
        done = now - start >= cfg.seconds
        if now - mark >= cfg.interval or done:
            sync(device)  # sync point: reporting boundary, so the interval's device work is really finished
            now = time.perf_counter()
            print(json.dumps({"run": label, **rates(interval, now - mark, loader, cfg)}), flush=True)
            interval = fresh_counts(loader, device)
            mark = now
        if done:
            break
    bar.close()
    batches.close()
    return {**rates(total, time.perf_counter() - start, loader, cfg), **started}


def noting_the_first(batches, built_at: float, note: dict):
    """`batches`, noting in `note` when the first arrived (seconds since `built_at`) and the child processes' memory
    then."""
    first = next(batches)
    note.update(first_batch_s=round(time.perf_counter() - built_at, 3), workers_pss_mb=workers_pss_mb())
    yield first
    yield from batches


def fresh_counts(loader, device: torch.device) -> dict:
    return {"images": 0, "padding": torch.zeros((), dtype=torch.int64, device=device), "wait": 0.0,
            "bytes": loader.bytes_read, "cpu": tree_cpu_seconds(), "boundaries": 0,
            "boundary_wait": 0.0, "batch_waits": 0, "batch_wait": 0.0}


def rates(acc: dict, seconds: float, loader, cfg: BenchConfig) -> dict:
    """Figures of one stretch; called after a sync, so reading the device-side padding count costs no stall."""
    images = acc["images"] - int(acc["padding"])
    img_s = images / seconds
    workers = loader.num_workers  # the host backend starts no more workers than steps
    out = {"img_s": round(img_s, 1), "img_s_per_worker": round(img_s / workers, 1),
           "data_wait": round(acc["wait"] / seconds, 3), "seconds": round(seconds, 2), "images": images}
    if acc["batch_waits"]:
        out["batch_wait_s"] = round(acc["batch_wait"] / acc["batch_waits"], 4)  # mean, batches inside an epoch
    if acc["boundaries"]:  # the longest wait for an epoch's first batch, and how many epoch starts the span held
        out.update(boundary_wait_s=round(acc["boundary_wait"], 4), epoch_starts=acc["boundaries"])
    if loader.bytes_read:  # loaders that read no shards (synthetic, torchvision's) count no bytes
        out["mb_s"] = round((loader.bytes_read - acc["bytes"]) / seconds / 1e6, 1)
    cpu = tree_cpu_seconds()
    if cpu is not None and acc["cpu"] is not None and cpu > acc["cpu"]:
        out["cpu_cores"] = round((cpu - acc["cpu"]) / seconds, 2)  # cores kept busy, all processes together
        out["img_per_cpu_s"] = round(images / (cpu - acc["cpu"]), 1)
    return out


def res_schedule(cfg: BenchConfig) -> ResSchedule | None:
    """--min-res's schedule, in multiples of --patch; None without. ScheduleError (a ValueError) naming the flag for
    one that cannot work."""
    return cfg.res_schedule(cfg.patch)


def spec_for(cfg: BenchConfig, device: torch.device, shards: ShardSet | None = None) -> dict:
    """`build_loader`'s arguments: train.py's from the shared DataConfig, and the benchmark's own. `shards`: the
    set, opened once (`DataConfig.open_data`)."""
    return dict(**loader_args(cfg, cfg.split, res_schedule(cfg)), batch_size=cfg.batch_size, device=device,
                seed=cfg.seed, prefetch=cfg.prefetch, dtype=getattr(torch, cfg.dtype), shards=shards)


def loader_spec(cfg: BenchConfig, device: torch.device) -> LoaderSpec:
    """The LoaderSpec `build_loader(**spec_for(...))` makes (for the baseline and the decode path, which follow the
    same transform policy)."""
    args = spec_for(cfg, device)
    del args["backend"]
    return LoaderSpec(**args)


def run(cfg: BenchConfig) -> dict:
    if cfg.dtype not in DTYPES:  # a BenchConfig made in code; the command line checks its choices
        raise ValueError(f"--dtype takes one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    device = torch.device(cfg.device)
    if device.type == "cpu" and cfg.model is None:
        # The loop itself computes nothing; idle intra-op threads would spin after each small CPU normalize and take
        # cores from the decode workers. No effect on the torchvision baseline, whose main process does no tensor
        # work.
        torch.set_num_threads(1)
    if device.type == "npu":
        import importlib

        importlib.import_module("torch_npu")  # registers the "npu" device with torch
    shards = cfg.open_data()
    step = model_step(cfg, shards.manifest.num_classes if shards else IMAGENET_CLASSES, device)
    built_at = time.perf_counter()
    loader = build_loader(**spec_for(cfg, device, shards))
    describe = loader.describe()
    print(f"bench: {describe}", file=sys.stderr)
    try:
        result = measure(loader, cfg, device, step, cfg.backend, built_at)
    finally:
        loader.close()
    from pipeline.host import pillow_flavour

    final = {"final": True, **result, "backend": cfg.backend, "workers": loader.num_workers,
             "batch_size": cfg.batch_size,
             "split": cfg.split, "img_size": cfg.img_size, "device": str(device), "model": cfg.model,
             "pillow": pillow_flavour(), "loader": describe, "restart_markers": restart_markers(shards),
             "torch": torch.__version__, "python": platform.python_version()}
    if res_schedule(cfg):
        final["res_schedule"] = res_schedule(cfg).describe(cfg.end_ramp + 1)
    if cfg.baseline:
        from pipeline.bench.baseline import TorchvisionLoader

        spec = loader_spec(cfg, device)
        built_at = time.perf_counter()
        base = TorchvisionLoader(cfg.baseline, spec)
        try:
            base_result = measure(base, cfg, device, step, "torchvision", built_at)
        except Exception as e:  # noqa: BLE001 - the baseline's own failure (e.g. timm's ops on a newer Pillow)
            # is a figure we could not take, not a failure of the measured loader: one line in the result
            final["baseline_error"] = baseline_error(e)
            return final
        finally:
            base.close()
        final["baseline_img_s"] = base_result["img_s"]
        final["ratio"] = round(result["img_s"] / base_result["img_s"], 2)
        if "img_per_cpu_s" in result and "img_per_cpu_s" in base_result:
            final["baseline_img_per_cpu_s"] = base_result["img_per_cpu_s"]
            final["cpu_ratio"] = round(result["img_per_cpu_s"] / base_result["img_per_cpu_s"], 2)
    return final


def baseline_error(e: Exception) -> str:
    """One line for a baseline that failed: the error's last line (a DataLoader worker's ends with the original)."""
    lines = str(e).strip().splitlines()
    return lines[-1] if lines and ":" in lines[-1] else f"{type(e).__name__}: {lines[-1] if lines else ''}"


def restart_markers(shards: ShardSet | None) -> bool | None:
    """Whether the shards were made with restart markers (what the region decoder can skip by); None: no shards."""
    return shards.manifest.settings.restart_markers if shards is not None else None


def time_single_core(fn, items: list, seconds: float) -> float:
    """Images per CPU-second of `fn` applied to `items` round robin for `seconds` (after a warm-up of 10). CPU time of
    this one-threaded process, so other jobs on the machine don't skew it."""
    for item in items[:10]:
        fn(item)
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        fn(items[n % len(items)])
        n += 1
    return n / (time.process_time() - start)


def decode_only(cfg: BenchConfig) -> dict:
    """One core, no processes, samples already in memory: the host worker's decode path (crop box, draft, one
    resize to uint8, flip), and with --baseline the torchvision transform on the same bytes. The per-core ceiling
    that `img_s_per_worker` of a loader run is compared with."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from pipeline.bench.baseline import baseline_transform
    from pipeline.host import pillow_flavour
    from pipeline.host_worker import WorkerConfig, decode
    from pipeline.shards.format import shard_list
    from pipeline.shards.reader import ShardReader

    cfg.host.validate()  # a decoder asked for and not built is an error, not a silent fallback
    torch.set_num_threads(1)  # the torchvision path's ToTensor/Normalize would otherwise use every core
    spec = loader_spec(cfg, torch.device("cpu"))
    shards = open_shard_set(cfg.data_path)  # the manifest read once, for the shard list and restart_markers
    samples, reader = [], ShardReader()
    for shard in shard_list(shards.path, cfg.split, shards.manifest):
        if len(samples) >= 2000:  # enough variety; keeps memory small on a full ImageNet shard set
            break
        samples += reader.read_all(shard)
    worker = WorkerConfig(worker=0, num_workers=1, planner=dataclasses.replace(spec, batch_size=1).planner([]),
                          transform=spec.transform, skip_bad=False, num_classes=None, slot_names=(),
                          decoder=cfg.host.resolved_decoder)
    out, rng = np.empty((cfg.img_size, cfg.img_size, 3), np.uint8), random.Random(cfg.seed)
    result = {"final": True, "decode_only": True, "split": cfg.split, "img_size": cfg.img_size,
              "pillow": pillow_flavour(), "decoder": worker.decoder, "restart_markers": restart_markers(shards),
              "samples": len(samples),
              "img_s": round(time_single_core(lambda s: decode(s, worker, rng, out, spec.transform), samples,
                                              cfg.seconds), 1)}
    if cfg.baseline:
        transform = baseline_transform(spec.transform)
        try:
            tv = time_single_core(lambda s: transform(Image.open(io.BytesIO(s.jpg)).convert("RGB")), samples,
                                  cfg.seconds)
        except Exception as e:  # noqa: BLE001 - the baseline's own failure, as in run()
            result["baseline_error"] = baseline_error(e)
            return result
        result.update(baseline_img_s=round(tv, 1), ratio=round(result["img_s"] / tv, 2))
    return result


def check(cfg: BenchConfig) -> None:
    """Mistakes caught before any worker starts or a minute of measuring is spent."""
    cfg.resolve_workers()
    for name in ("batch_size", "workers", "img_size", "epoch_stride"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.seconds <= 0:
        raise ValueError(f"--seconds must be > 0, got {cfg.seconds}")
    if res_schedule(cfg) and cfg.split != "train":
        raise ValueError("--min-res: a schedule changes the train side; --split val keeps --img-size")
    if cfg.data_path is None and (cfg.decode_only or get_backend(cfg.backend).reads_shards):
        raise ValueError("--data_path is needed (shards made by tools/make_shards.py)")
    if cfg.baseline and not cfg.decode_only and not os.path.isdir(os.path.join(cfg.baseline, cfg.split)):
        raise ValueError(f"--baseline {cfg.baseline}: no {cfg.split}/ folder there (an ImageFolder root is needed)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA GPU visible to torch")


def main(argv=None) -> int:
    cfg = from_args(BenchConfig, vars(build_parser().parse_args(argv)))
    try:
        check(cfg)
        final = decode_only(cfg) if cfg.decode_only else run(cfg)
    except (PipelineError, ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"pipeline.bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline.bench: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(final), flush=True)
    return 0
