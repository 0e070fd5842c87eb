"""GPU check of the dali backend: mixed (nvJPEG + hardware JPEG) decode on a CUDA device, labels, a grid, img/s.

    python tools/gpu_check_dali.py --work /tmp/dali_check [--images-per-class 300] [--batch-size 256] [--workers 8]

Makes a realistic sample set (tools/make_sample_data.py, 10 classes) and its shards under --work unless they are
there, then:
  1. labels: one val epoch through DALI on the GPU and DALI on the CPU: same labels in the same order, and the mean
     absolute pixel difference (0..255) between nvJPEG's and libjpeg-turbo's decode, per image (max) and overall;
  2. grid: tools/parity_grid.py --device cuda, host vs DALI-on-GPU, train and val PNGs under --work;
  3. speed: the pipeline alone (nothing consumes the batches), train split, for normalize_in torch and dali. Per
     epoch, the first batch is timed apart from the rest: `steady_img_s` is the rest, `epoch_start_s` the first
     batch's latency (epoch 0: the pipeline's build, the decoders' start and the first decode; later epochs follow
     on in the same pipeline, so theirs should be one batch's time). The device is synchronized only at
     the end of each timed span.
Prints one JSON line per result and writes them all to --work/gpu_check_dali.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline import build_loader
from pipeline.dali import DaliOptions
from pipeline.shards import atomicio
from pipeline.shards.format import MANIFEST

ROOT = Path(__file__).resolve().parent.parent


def ensure_shards(work: Path, per_class: int) -> Path:
    src, shards = work / "imagefolder", work / "shards"
    if not (shards / MANIFEST).is_file():
        tool = [sys.executable, "-u"]
        subprocess.run([*tool, ROOT / "tools/make_sample_data.py", src, "--classes", "10", "--train-per-class",
                        str(per_class), "--val-per-class", str(per_class // 10)], check=True)
        subprocess.run([*tool, ROOT / "tools/make_shards.py", "--data_path", src, "--out", shards,
                        "--samples-per-shard", "500"], check=True)
    return shards


def val_epoch(shards: Path, device: str, args) -> tuple[torch.Tensor, torch.Tensor]:
    loader = build_loader(data_path=shards, split="val", backend="dali", batch_size=64, device=device,
                          workers=args.workers, img_size=224, dtype=torch.uint8)
    try:
        batches = [(x.cpu(), y.cpu()) for x, y in loader]
    finally:
        loader.close()
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def check_labels(shards: Path, args) -> dict:
    gpu, gpu_labels = val_epoch(shards, "cuda", args)
    cpu, cpu_labels = val_epoch(shards, "cpu", args)
    real = cpu_labels >= 0
    diff = (gpu[real].float() - cpu[real].float()).abs().mean(dim=(1, 2, 3))
    return {"check": "labels", "same_labels": gpu_labels.tolist() == cpu_labels.tolist(),
            "val_samples": int(real.sum()), "gpu_vs_cpu_mean_abs": round(diff.mean().item(), 2),
            "gpu_vs_cpu_max_image_mean_abs": round(diff.max().item(), 2)}


def speed(shards: Path, normalize_in: str, args) -> dict:
    loader = build_loader(data_path=shards, split="train", backend="dali", batch_size=args.batch_size,
                          device="cuda", workers=args.workers, img_size=224, dtype=torch.float32,
                          options=DaliOptions(normalize_in=normalize_in))
    starts, steady_images, steady_s = [], 0, 0.0
    try:
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            batches = iter(loader)
            next(batches)
            torch.cuda.synchronize()  # sync point: the first batch is really on the device
            t1 = time.perf_counter()
            n = sum(len(y) for _, y in batches)
            torch.cuda.synchronize()  # sync point: end of the steady span
            starts.append(t1 - t0)
            steady_images, steady_s = steady_images + n, steady_s + time.perf_counter() - t1
        describe = loader.describe()
    finally:
        loader.close()
    return {"check": "speed", "normalize_in": normalize_in, "steady_img_s": round(steady_images / steady_s, 1),
            "epoch_start_s": [round(s, 3) for s in starts], "batch_size": args.batch_size,
            "workers": args.workers, "loader": describe}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="folder for the sample set, shards, grids and results")
    p.add_argument("--images-per-class", type=int, default=300, help="train images per class (10 classes)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8, help="DALI threads")
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check_dali: error: no CUDA device visible to torch", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(work, args.images_per_class)
    results = [{"check": "device", "name": torch.cuda.get_device_name(), "torch": torch.__version__}]
    results.append(check_labels(shards, args))
    for split in ("val", "train"):
        grid = subprocess.run([sys.executable, ROOT / "tools/parity_grid.py", "--data_path", shards, "--out",
                               work / f"grid_{split}.png", "--split", split, "--device", "cuda"])
        results.append({"check": "grid", "split": split, "ok": grid.returncode == 0,
                        "png": str(work / f"grid_{split}.png")})
    results += [speed(shards, normalize_in, args) for normalize_in in ("torch", "dali")]
    for r in results:
        print(json.dumps(r), flush=True)
    atomicio.write_json(work / "gpu_check_dali.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
