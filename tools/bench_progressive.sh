#!/usr/bin/env bash
# Time to accuracy with progressive resolution, on a CPU: the quick start's run (the 10-class sample set of
# tools/demo.sh, vit_tiny_patch16_224, 8 epochs) at a fixed 64 px against a ramp 32 -> 64 px (32 px up to epoch 3,
# 48 px at 4-5, 64 px from 6; eval at 64), the same seeds, both in this one run. Each run's wall time (train.py's
# summary: start to end, one evaluation included) and final Acc@1 go to OUT_DIR/progressive.jsonl, one line each; a
# table with the means and their ratio follows on stdout (docs/training.md, "Progressive resolution").
#
#   bash tools/bench_progressive.sh OUT_DIR [SEEDS]      # PYTHON=.venv/bin/python by default; SEEDS="0 1 2"
#
# Set EPOCHS, START_RAMP, END_RAMP, MIN_RES to try other schedules.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
[ $# -ge 1 ] || { echo "usage: bash tools/bench_progressive.sh OUT_DIR [SEEDS]" >&2; exit 2; }
out=$1 seeds=${2:-0 1 2}
py=${PYTHON:-.venv/bin/python}
epochs=${EPOCHS:-8} start=${START_RAMP:-3} end=${END_RAMP:-6} min=${MIN_RES:-32}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
if [ ! -f data/sample-shards/manifest.json ]; then  # what tools/demo.sh makes
  [ -d data/sample/train ] || "$py" tools/make_sample_data.py data/sample --classes 10 --train-per-class 260 \
    --val-per-class 20 --seed 0 --min-side 96 --max-side 160 >/dev/null
  "$py" tools/make_shards.py --data_path data/sample --out data/sample-shards >/dev/null
fi
common=(--data_path data/sample-shards --backend host --workers 1 --device cpu --model vit_tiny_patch16_224
        --img-size 64 --batch-size 64 --epochs "$epochs" --lr 1e-3 --warmup-epochs 1 --eval-freq "$epochs" -p 1000
        --no-plots)
: > "$out/progressive.jsonl"
for seed in $seeds; do
  for run in fixed ramp; do
    flags=()
    [ "$run" = ramp ] && flags=(--min-res "$min" --max-res 64 --start-ramp "$start" --end-ramp "$end")
    dir="$out/$run-seed$seed"
    rm -rf "$dir"
    "$py" train.py "${common[@]}" "${flags[@]}" --seed "$seed" --output "$dir" >/dev/null
    "$py" - "$dir" "$run" "$seed" >> "$out/progressive.jsonl" <<'EOF'
import json, sys
from pathlib import Path
folder, run, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
summary = json.loads((folder / "summary.json").read_text())
train = [r for r in rows if r["kind"] == "train"]
sides = {r["epoch"]: r["img_size"] for r in train}
print(json.dumps({"run": run, "seed": seed, "wall_s": round(summary["wall_s"], 1),
                  "acc1": [r for r in rows if r["kind"] == "eval"][-1]["acc1"],
                  "sides": [sides[e] for e in sorted(sides)]}))
EOF
  done
done
"$py" - "$out/progressive.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {run: [r for r in rows if r["run"] == run] for run in ("fixed", "ramp")}
print("| run | sides per epoch | wall s (each seed) | mean wall s | Acc@1 (each seed) | mean Acc@1 |")
print("|---|---|---|---|---|---|")
for run, rs in by.items():
    walls = ", ".join(str(r["wall_s"]) for r in rs)
    accs = ", ".join(format(r["acc1"], ".1f") for r in rs)
    mean_wall, mean_acc = statistics.mean(r["wall_s"] for r in rs), statistics.mean(r["acc1"] for r in rs)
    print(f"| {run} | {rs[0]['sides']} | {walls} | {mean_wall:.1f} | {accs} | {mean_acc:.2f} |")
wall = {run: statistics.mean(r["wall_s"] for r in rs) for run, rs in by.items()}
acc = {run: statistics.mean(r["acc1"] for r in rs) for run, rs in by.items()}
print(f"\nramp: {wall['fixed'] / wall['ramp']:.2f}x less wall time, Acc@1 {acc['ramp'] - acc['fixed']:+.2f} points")
EOF
