"""Save one batch from the host and the dali backend side by side, denormalized, as a PNG a person can look at.

    python tools/parity_grid.py --data_path SHARDS --out grid.png [--split val] [--count 16] [--img-size 224]

Left block: host backend (Pillow), right block: dali backend, the same first batch of the epoch. Val batches hold
the same samples in the same order (both read the manifest order; the host runs one worker here), so tiles should
match pixel for pixel up to resampling; train batches are different random crops of the epoch's samples, so look
for plausible crops, flips and colours. Each tile is captioned with its label. Also prints the per-channel mean/std
of each block, 0..255. Runs on the CPU (DALI's CPU operators); --device cuda shows DALI's GPU decode instead.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipeline import PipelineError, build_loader
from pipeline.shards import atomicio

CAPTION = 14  # pixels of caption strip under each tile
GAP = 16  # pixels between the two blocks


def first_batch(backend: str, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, H, W, 3) uint8 pixels and labels of the epoch's first batch."""
    loader = build_loader(data_path=args.data_path, split=args.split, backend=backend, batch_size=args.count,
                          device=args.device if backend == "dali" else "cpu", workers=1 if backend == "host" else 2,
                          seed=args.seed, img_size=args.img_size, dtype=torch.uint8)
    try:
        images, labels = next(iter(loader))
        return images.permute(0, 2, 3, 1).cpu().contiguous(), labels.cpu()
    finally:
        loader.close()


def block(images: torch.Tensor, labels: torch.Tensor, title: str) -> Image.Image:
    n, size = len(images), images.shape[1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = Image.new("RGB", (cols * size, CAPTION + rows * (size + CAPTION)), "white")
    draw = ImageDraw.Draw(out)
    draw.text((2, 1), title, fill="black")
    for i in range(n):
        x, y = (i % cols) * size, CAPTION + (i // cols) * (size + CAPTION)
        out.paste(Image.fromarray(images[i].numpy()), (x, y))
        draw.text((x + 2, y + size + 1), f"label {int(labels[i])}", fill="black")
    return out


def stats(images: torch.Tensor) -> dict:
    x = images.float()
    return {"mean": [round(v, 1) for v in x.mean(dim=(0, 1, 2)).tolist()],
            "std": [round(v, 1) for v in x.std(dim=(0, 1, 2)).tolist()]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", "--data-path", required=True, help="shard folder (tools/make_shards.py)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--count", type=int, default=16, help="images per backend (one batch)")
    p.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where DALI decodes: cpu, or cuda for its GPU decoder")
    args = p.parse_args(argv)
    try:
        host, host_labels = first_batch("host", args)
        dali, dali_labels = first_batch("dali", args)
    except (PipelineError, ValueError, RuntimeError) as e:  # DALI missing is a RuntimeError too (DaliMissingError)
        print(f"parity_grid: error: {e}", file=sys.stderr)
        return 2
    left = block(host, host_labels, f"host ({args.split})")
    right = block(dali, dali_labels, f"dali ({args.split}, {args.device})")
    grid = Image.new("RGB", (left.width + GAP + right.width, max(left.height, right.height)), "white")
    grid.paste(left, (0, 0))
    grid.paste(right, (left.width + GAP, 0))
    png = io.BytesIO()
    grid.save(png, "PNG")
    atomicio.write_bytes(Path(args.out), png.getvalue())
    report = {"out": args.out, "split": args.split, "host": stats(host), "dali": stats(dali),
              "same_labels": host_labels.tolist() == dali_labels.tolist()}
    if args.split == "val":
        report["mean_abs_diff"] = round((host.float() - dali.float()).abs().mean().item(), 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
