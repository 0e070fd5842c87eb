#!/usr/bin/env bash
# What --aa and --color-jitter cost, and our loader against timm's own on the same JPEGs: the figures of
# docs/pipeline.md ("Augmentation"). Makes the sample JPEGs of tools/bench_host.sh (mean ~95 KB, 300-640 px, like
# ImageNet's) and their shards (restart markers), then runs `python -m pipeline.bench`:
#   - the host loader, 2 workers, float32 and uint8, without augmentation (baseline: torchvision's transform) and
#     with each policy (baseline: an ImageFolder + DataLoader with timm's create_transform(auto_augment=SPEC));
#   - the one-core decode path (--decode-only), without and with each policy, against timm's transform on the same
#     bytes.
# One JSON line per run goes to OUT/augment.jsonl; a table of the ratios (per CPU-second) follows on stdout.
#
#   bash tools/bench_augment.sh DATA_DIR OUT_DIR     # PYTHON=.venv/bin/python by default; SECONDS_PER_RUN=20
#
# The Pillow flavour is whatever the environment has (the "pillow" field of each line says which): run it once
# with Pillow-SIMD (tools/setup.sh's default) and once in an environment with stock Pillow to compare.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
[ $# -eq 2 ] || { echo "usage: bash tools/bench_augment.sh DATA_DIR OUT_DIR" >&2; exit 2; }
data=$1 out=$2
py=${PYTHON:-.venv/bin/python}
secs=${SECONDS_PER_RUN:-20}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
[ -d "$data/jpeg/train" ] || "$py" "$here/make_sample_data.py" "$data/jpeg" --classes 4 --train-per-class 128 \
    --val-per-class 16 --seed 1
"$py" "$here/make_shards.py" --data_path "$data/jpeg" --out "$data/shards" --samples-per-shard 128 \
    --restart-markers >/dev/null
bench() {  # label, then pipeline.bench flags
    local label=$1; shift
    "$py" -m pipeline.bench --batch-size 64 --seconds "$secs" --interval 1000 "$@" 2>/dev/null | tail -1 |
        "$py" -c "import json, sys; d = json.loads(sys.stdin.read()); d['run'] = sys.argv[1]; print(json.dumps(d))" \
        "$label" >> "$out/augment.jsonl"
}
policies=("rand-m9-mstd0.5-inc1" "original" "ta_wide")
for dtype in float32 uint8; do
    bench "loader $dtype none" --data_path "$data/shards" --baseline "$data/jpeg" --workers 2 --dtype "$dtype"
    for aa in "${policies[@]}"; do
        bench "loader $dtype $aa" --data_path "$data/shards" --baseline "$data/jpeg" --workers 2 --dtype "$dtype" \
            --aa "$aa"
    done
done
bench "one core none" --data_path "$data/shards" --decode-only --baseline x --seconds 8
for aa in "${policies[@]}"; do
    bench "one core $aa" --data_path "$data/shards" --decode-only --baseline x --seconds 8 --aa "$aa"
done
bench "one core color-jitter 0.4" --data_path "$data/shards" --decode-only --baseline x --seconds 8 \
    --color-jitter 0.4
"$py" - "$out/augment.jsonl" <<'PY'
import json, sys

runs = [json.loads(line) for line in open(sys.argv[1])]
print(f"| run | Pillow | ours img/s | ours img/CPU-s | baseline | ratio per CPU-s | kept of no-augmentation |")
print("|---|---|---|---|---|---|---|")
plain = {}
for r in runs:
    key = r["run"].rsplit(" ", 1)[0] if r["run"].startswith("loader") else "one core"
    rate = r.get("img_per_cpu_s", r["img_s"])
    if r["run"].endswith(" none"):
        plain[(key, r["pillow"])] = rate
    kept = rate / plain[(key, r["pillow"])] if (key, r["pillow"]) in plain else float("nan")
    base = r.get("baseline_img_per_cpu_s", r.get("baseline_img_s"))
    ratio = r.get("cpu_ratio", r.get("ratio"))
    base = f"{base:,.0f}" if base is not None else f"failed: {r.get('baseline_error')}"
    print(f"| {r['run']} | {r['pillow'].split(' (')[0]} | {r['img_s']:,.0f} | {rate:,.0f} | {base} | "
          f"{ratio if ratio is not None else '-'} | {kept:.2f} |")
PY
