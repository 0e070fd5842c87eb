"""The time of a --min-res run on a full data set, projected from tools/bench_train.py's img/s at each side.

Each epoch takes --images / (img/s at that epoch's side); the schedule's total is set against the same epochs at
--img-size throughout. The img/s come from RESULTS (the JSON lines tools/bench_train.py and tools/bench_gpu.sh
write): per side, the last row of the first --loop (in the order given) measured at that side for --model and
--batch-size. What it leaves out: the evaluations, the start-up, and compile time (one graph per side).

  python tools/project_schedule.py RESULTS --min-res 128 --max-res 224 --start-ramp 10 --end-ramp 30 --epochs 40
  python tools/project_schedule.py RESULTS --loop ours_dynamic --loop ours_synthetic ...   # the model at 224,
      fed each side as train.py's is (timm's dynamic_img_size), else the model built at the side
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.resolution import FLAG_HELP, ScheduleError, from_flags

IMAGENET_TRAIN = 1_281_167


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("results", type=Path, help="tools/bench_train.py's JSON lines (its --out)")
    for name, text in FLAG_HELP.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=0, help=text)
    p.add_argument("--epochs", type=int, required=True, help="the run's epochs")
    p.add_argument("--img-size", type=int, default=224, help="the fixed run's side, and --max-res's default")
    p.add_argument("--patch", type=int, default=32, help="the model's patch size: every side is a multiple of it")
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="train images per epoch (ImageNet-1k's)")
    p.add_argument("--loop", action="append", help="bench_train.py's loop to take img/s from, in order of "
                                                   "preference (repeatable); none given = ours_dali")
    p.add_argument("--model", default="vit_base_patch32_224", help="only rows of this model")
    p.add_argument("--batch-size", type=int, default=0,
                   help="only rows of this batch size; 0 = the rows' one batch size (an error if they have several)")
    return p.parse_args(argv)


def speeds(rows: list[dict], loops: list[str], model: str, batch_size: int) -> dict[int, tuple[str, float]]:
    """side -> (loop, img/s): per side, the first of `loops` measured there, its last row (a rerun supersedes)."""
    rows = [r for r in rows if r.get("loop") in loops and r.get("model") == model and "img_s" in r
            and "img_size" in r and (not batch_size or r.get("batch_size") == batch_size)]
    sizes = sorted({r.get("batch_size") or 0 for r in rows})  # 0: a row that gives none
    if len(sizes) > 1:
        raise ValueError(f"figures at batch sizes {', '.join(map(str, sizes))}: choose one with --batch-size")
    found: dict[tuple[str, int], float] = {}
    for r in rows:
        found[r["loop"], r["img_size"]] = r["img_s"]
    by_side: dict[int, tuple[str, float]] = {}
    for (loop, side), img_s in found.items():
        if side not in by_side or loops.index(loop) < loops.index(by_side[side][0]):
            by_side[side] = (loop, img_s)
    return by_side


def project(args: argparse.Namespace, rows: list[dict]) -> dict:
    """The schedule's and the fixed run's seconds, per epoch and in all; ValueError naming what is missing."""
    schedule = from_flags(args.min_res, args.max_res, args.start_ramp, args.end_ramp, args.img_size, args.patch)
    sides = schedule.sizes(args.epochs) if schedule else [args.img_size] * args.epochs
    loops = args.loop or ["ours_dali"]
    by_side = speeds(rows, loops, args.model, args.batch_size)
    missing = sorted({*sides, args.img_size} - set(by_side))
    if missing:
        raise ValueError(f"no {' or '.join(loops)} figure for {args.model} at {', '.join(map(str, missing))} px in "
                         f"{args.results} (tools/bench_train.py --img-size SIDE measures one)")
    epoch_s = [args.images / by_side[side][1] for side in sides]
    fixed_s = args.epochs * args.images / by_side[args.img_size][1]
    return {"projection": loops, "model": args.model, "epochs": args.epochs, "images": args.images,
            "schedule": schedule.describe(args.epochs) if schedule else f"{args.img_size} px",
            "img_s": {str(side): {"loop": loop, "img_s": img_s} for side, (loop, img_s) in sorted(by_side.items())
                      if side in sides or side == args.img_size},
            "epoch_s": [round(s, 1) for s in epoch_s], "schedule_s": round(sum(epoch_s), 1),
            "fixed_s": round(fixed_s, 1), "less_time": round(fixed_s / sum(epoch_s), 4)}


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else \
        f"{seconds:.1f} s"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        result = project(args, rows)
    except (OSError, json.JSONDecodeError, ScheduleError, ValueError) as e:
        sys.exit(f"project_schedule: {e}")
    print(f"{result['model']}, {args.epochs} epochs of {args.images} images: {result['schedule']}")
    for side, figure in result["img_s"].items():
        print(f"  {side} px: {figure['img_s']:.1f} img/s ({figure['loop']}), "
              f"{duration(args.images / figure['img_s'])} per epoch")
    print(f"schedule {duration(result['schedule_s'])} against {duration(result['fixed_s'])} at {args.img_size} px "
          f"throughout: {result['less_time']:.2f}x less time")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
