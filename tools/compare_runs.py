"""Training curves of several train.py runs side by side, per epoch, from their metrics.jsonl: the mean of the logged
train losses and Acc@1 (the --json output adds Acc@5). For judging a lossy option (e.g. --fp8) against the default
on the same data and seed.

    python tools/compare_runs.py output/curve-bf16 output/curve-fp8 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from trainlib.runlog import read_metrics


def curve(run: Path) -> dict[int, dict]:
    """{epoch: {"loss", "acc1", "acc5"}} from a run folder's metrics.jsonl (less what a resume superseded: the records
    of steps a resumed run trained again)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run}: no metrics.jsonl (is it a train.py --output folder?)")
    losses, rows = defaultdict(list), defaultdict(dict)
    for r in read_metrics(run):
        if r.get("kind") == "train":
            losses[r["epoch"]].append(r["loss"])
        elif r.get("kind") == "eval":
            rows[r["epoch"]].update(acc1=r["acc1"], acc5=r["acc5"])
    for epoch, values in losses.items():
        rows[epoch]["loss"] = sum(values) / len(values)  # mean of the logged (every --print-freq) losses
    return dict(sorted(rows.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="train.py --output folders")
    p.add_argument("--json", type=Path, help="also write the curves here")
    args = p.parse_args(argv)
    curves = {run.name: curve(run) for run in args.runs}
    epochs = sorted({e for c in curves.values() for e in c})
    head = " | ".join(f"{name} loss | {name} Acc@1" for name in curves)
    print(f"| epoch | {head} |\n|---|" + "---|---|" * len(curves))
    for e in epochs:
        cells = []
        for c in curves.values():
            row = c.get(e, {})
            cells += [f"{row['loss']:.4f}" if "loss" in row else "–",
                      f"{row['acc1']:.1f}" if "acc1" in row else "–"]
        print(f"| {e} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({name: {str(e): v for e, v in c.items()} for name, c in curves.items()},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
