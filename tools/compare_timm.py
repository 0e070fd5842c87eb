"""One recipe through timm's own train.py and through ours, on the same shards, epochs and seeds: wall time and final
Acc@1 (the raw weights' and the EMA's) of each run, side by side. The recipe's flags are spelled the same for both
trainers (ours takes timm's names); only the data, model and device flags differ.

    python tools/compare_timm.py --timm-train path/to/pytorch-image-models/train.py --data data/sample-shards \\
        --out output/compare-timm --seeds 0 1

timm's train.py is not part of the timm package: take it from a checkout of pytorch-image-models at (or near) the
installed timm's version. It reads our shards through its webdataset reader (`--dataset wds/...`, our
`_info.json`). Results: a table on stdout and `<out>/compare.json`.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# DeiT's recipe in miniature: RandAugment, mixup 0.8, cutmix 1.0, random erasing 0.25, label smoothing 0.1, EMA
# (its decay shortened to a run of a few hundred steps), AdamW with a warm-up and a cosine.
RECIPE = ["--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
          "--smoothing", "0.1", "--model-ema", "--model-ema-decay", "0.99", "--opt", "adamw", "--lr", "1e-3",
          "--weight-decay", "0.05", "--warmup-epochs", "1", "--min-lr", "1e-6", "--clip-grad", "1.0"]
TIMM_TEST = re.compile(r"Test( \(EMA\))?: \[\s*(\d+)/(\d+)\].*Acc@1:\s*[\d.]+\s*\(\s*([\d.]+)\)")


def commands(args, seed: int, out: Path) -> dict[str, list[str]]:
    common = [*RECIPE, "--seed", str(seed), "--epochs", str(args.epochs), "-b", str(args.batch_size),
              "--workers", str(args.workers), "--model", args.model, "--img-size", str(args.img_size)]
    info = json.loads((Path(args.data) / "_info.json").read_text())
    classes = len(json.loads((Path(args.data) / "classes.json").read_text()))
    val = "validation" if "validation" in info["splits"] else "val"
    timm_cmd = [sys.executable, str(args.timm_train), *common, "--data-dir", str(args.data),
                "--dataset", f"wds/{info.get('name', 'shards')}", "--train-split", "train", "--val-split", val,
                "--num-classes", str(classes), "--model-kwargs", f"img_size={args.img_size}", "--device",
                args.device, "--output", str(out / "timm"), "--experiment", f"seed{seed}", "--log-interval", "1000"]
    if args.device == "cpu":
        timm_cmd.append("--no-prefetcher")  # its prefetcher is the CUDA one
    ours_cmd = [sys.executable, str(ROOT / "train.py"), *common, "--data_path", str(args.data), "--device",
                args.device, "--backend", args.backend, "--eval-freq", "1", "-p", "1000",
                "--output", str(out / "ours" / f"seed{seed}"), "--no-plots"]
    return {"timm": timm_cmd, "ours": ours_cmd}


def shown(cmd: list[str], timm_train: Path) -> str:
    """The command as a reader reruns it: python, paths inside the repo relative to it, timm's script by role."""
    words = ["python" if w == sys.executable else "TIMM_TRAIN_PY" if w == str(timm_train) else
             str(Path(w).relative_to(ROOT)) if w.startswith(str(ROOT) + "/") else w for w in cmd]
    return " ".join(words)


def timm_result(log: str) -> dict:
    """Final Acc@1 of the raw and EMA weights from timm's log (the last line of each validation pass holds the
    running mean over the whole split)."""
    raw, ema = None, None
    for m in TIMM_TEST.finditer(log):
        if m.group(2) == m.group(3):
            if m.group(1):
                ema = float(m.group(4))
            else:
                raw = float(m.group(4))
    return {"acc1": raw, "ema_acc1": ema}


def ours_result(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "eval"][-1]
    summary = json.loads((out / "summary.json").read_text())
    return {"acc1": last["acc1"], "ema_acc1": last.get("ema_acc1"), "fps": summary["fps"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (pytorch-image-models)")
    p.add_argument("--data", required=True, help="a shard folder written by tools/make_shards.py")
    p.add_argument("--out", type=Path, default=Path("output/compare-timm"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="data workers, both trainers")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="host", help="our input pipeline")
    args = p.parse_args(argv)
    if not args.timm_train.is_file():
        p.error(f"--timm-train {args.timm_train}: no such file (take train.py from pytorch-image-models)")
    if not (Path(args.data) / "_info.json").is_file():
        p.error(f"--data {args.data}: no _info.json (a folder written by tools/make_shards.py?)")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for name, cmd in commands(args, seed, args.out).items():
            print(f"compare_timm: seed {seed}, {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            log = proc.stdout + proc.stderr
            (args.out / f"{name}-seed{seed}.log").write_text(log)
            if proc.returncode:
                print(f"compare_timm: {name} failed (exit {proc.returncode}); its log: "
                      f"{args.out / f'{name}-seed{seed}.log'}\n{log[-2000:]}", file=sys.stderr)
                return 1
            result = timm_result(log) if name == "timm" else ours_result(args.out / "ours" / f"seed{seed}")
            runs.append({"trainer": name, "seed": seed, "wall_s": round(wall, 1), **result,
                         "command": shown(cmd, args.timm_train)})
    print("| trainer | seed | wall s | Acc@1 | EMA Acc@1 |\n|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['trainer']} | {r['seed']} | {r['wall_s']} | {r['acc1']} | {r['ema_acc1']} |")
    for name in ("timm", "ours"):
        mine = [r for r in runs if r["trainer"] == name]
        print(f"{name}: mean wall {sum(r['wall_s'] for r in mine) / len(mine):.1f} s, mean Acc@1 "
              f"{sum(r['acc1'] for r in mine) / len(mine):.2f}, mean EMA Acc@1 "
              f"{sum(r['ema_acc1'] for r in mine) / len(mine):.2f}")
    (args.out / "compare.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
