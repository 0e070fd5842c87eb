#!/usr/bin/env bash
# Time to accuracy with progressive resolution, on a CPU: the quick start's run (the 10-class sample set of
# tools/demo.sh, vit_tiny_patch16_224, 8 epochs) at a fixed 64 px against ramps, the same seeds, all in this one
# run. A ramp MIN:START:END[:MAX] is --min-res MIN --start-ramp START --end-ramp END --max-res MAX (64 by default);
# the default 32:3:6 trains at 32 px up to epoch 3, 48 px at 4-5, 64 px from 6. Every run evaluates at 64 px.
# SHORT="5 6" adds the fixed run with fewer epochs (fixed@5, ...): the plain way to spend less time, which a ramp
# has to beat at the same time. TEST_SIDES="48 80" evaluates each run's last checkpoint again at those sides too
# (train low, test high: FixRes). Each run's wall time (train.py's summary: start to end, one evaluation included),
# CPU time (user + system, its worker processes included: on a shared machine the steadier figure, as time stolen
# by other guests is not in it), final Acc@1 and Acc@1 per test side go to OUT_DIR/progressive.jsonl, one line
# each; a table with the means and each run's ratios to the fixed runs follows on stdout (docs/training.md,
# "Progressive resolution").
#
#   bash tools/bench_progressive.sh OUT_DIR [SEEDS]      # PYTHON=.venv/bin/python by default; SEEDS="0 1 2"
#   RAMPS="32:3:6 48:3:6" bash tools/bench_progressive.sh OUT_DIR      # several schedules against one baseline
#   RAMPS="32:3:6 32:3:6:48" SHORT="5 6" TEST_SIDES="48 80" bash tools/bench_progressive.sh OUT_DIR
#
# EPOCHS (8) sets the run's length.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
[ $# -ge 1 ] || { echo "usage: bash tools/bench_progressive.sh OUT_DIR [SEEDS]" >&2; exit 2; }
out=$1 seeds=${2:-0 1 2}
py=${PYTHON:-.venv/bin/python}
epochs=${EPOCHS:-8} ramps=${RAMPS:-32:3:6} short=${SHORT:-} test_sides=${TEST_SIDES:-}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
if [ ! -f data/sample-shards/manifest.json ]; then  # what tools/demo.sh makes
  [ -d data/sample/train ] || "$py" tools/make_sample_data.py data/sample --classes 10 --train-per-class 260 \
    --val-per-class 20 --seed 0 --min-side 96 --max-side 160 >/dev/null
  "$py" tools/make_shards.py --data_path data/sample --out data/sample-shards >/dev/null
fi
common=(--data_path data/sample-shards --backend host --workers 1 --device cpu --model vit_tiny_patch16_224
        --img-size 64 --eval-img-size 64 --batch-size 64 --lr 1e-3 --warmup-epochs 1 -p 1000 --no-plots)
: > "$out/progressive.jsonl"
for seed in $seeds; do
  for run in fixed ${short:+$(printf 'fixed@%s ' $short)} $ramps; do
    flags=(--epochs "$epochs" --eval-freq "$epochs")
    case "$run" in
      fixed) ;;
      fixed@*) flags=(--epochs "${run#fixed@}" --eval-freq "${run#fixed@}") ;;
      *) IFS=: read -r min start end max <<< "$run"
         flags+=(--min-res "$min" --max-res "${max:-64}" --start-ramp "$start" --end-ramp "$end") ;;
    esac
    dir="$out/${run//[:@]/-}-seed$seed"
    rm -rf "$dir"
    TIMEFORMAT='%U %S'  # bash's time: the user and system seconds of train.py and the children it waited for
    { time "$py" train.py "${common[@]}" "${flags[@]}" --seed "$seed" --output "$dir" >/dev/null \
        2>"$out/train.err"; } 2>"$out/cpu.txt" || { cat "$out/train.err" >&2; exit 1; }
    for side in $test_sides; do  # the same weights at another test side: the eval is not in the run's times
      "$py" train.py "${common[@]}" --eval-img-size "$side" --evaluate --resume "$dir/last.pth" \
        --output "$dir/test-$side" >/dev/null 2>"$out/train.err" || { cat "$out/train.err" >&2; exit 1; }
    done
    read -r user sys <"$out/cpu.txt"
    "$py" - "$dir" "$run" "$seed" "$user" "$sys" >> "$out/progressive.jsonl" <<'EOF'
import json, sys
from pathlib import Path
folder, run, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cpu_s = float(sys.argv[4]) + float(sys.argv[5])
def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
def last_eval(folder):
    return [r for r in rows(folder) if r["kind"] == "eval"][-1]
summary = json.loads((folder / "summary.json").read_text())
sides = {r["epoch"]: r["img_size"] for r in rows(folder) if r["kind"] == "train"}
final = last_eval(folder)
tests = {final["img_size"]: final["acc1"]}
tests.update((r["img_size"], r["acc1"]) for r in map(last_eval, sorted(folder.glob("test-*"))))
print(json.dumps({"run": run, "seed": seed, "wall_s": round(summary["wall_s"], 1), "cpu_s": round(cpu_s, 1),
                  "acc1": final["acc1"], "sides": [sides[e] for e in sorted(sides)],
                  "acc1_at": {str(side): tests[side] for side in sorted(tests)}}))
EOF
  done
done
"$py" - "$out/progressive.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["run"], []).append(r)
mean = {key: {run: statistics.mean(r[key] for r in rs) for run, rs in by.items()}
        for key in ("wall_s", "cpu_s", "acc1")}
tests = sorted({int(side) for r in rows for side in r.get("acc1_at", {})})
tests = tests if len(tests) > 1 else []  # without TEST_SIDES: only the run's own, already in the table
print("| run | sides per epoch | wall s (each seed) | CPU s (each seed) | Acc@1 (each seed) "
      "| less wall time | less CPU time | mean Acc@1 (change) |" + "".join(f" mean Acc@1 at {t} px |" for t in tests))
print("|---|---|---|---|---|---|---|---|" + "---|" * len(tests))
for run, rs in by.items():
    each = {key: ", ".join(format(r[key], ".1f") for r in rs) for key in ("wall_s", "cpu_s", "acc1")}
    wall, cpu = (mean[key]["fixed"] / mean[key][run] for key in ("wall_s", "cpu_s"))
    acc, change = mean["acc1"][run], mean["acc1"][run] - mean["acc1"]["fixed"]
    at = "".join(f" {statistics.mean(r['acc1_at'][str(t)] for r in rs):.2f} |" for t in tests)
    print(f"| {run} | {rs[0]['sides']} | {each['wall_s']} | {each['cpu_s']} | {each['acc1']} | {wall:.2f}x "
          f"| {cpu:.2f}x | {acc:.2f} ({change:+.2f}) |{at}")
EOF
