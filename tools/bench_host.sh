#!/usr/bin/env bash
# The host backend against torchvision on the same JPEGs: the figures of docs/pipeline.md ("Measured figures", its
# first two sections). Makes the sample JPEGs (mean ~95 KB, 300-640 px, like ImageNet's) and three shard sets: with
# restart markers (make_shards' default where the region decoder is built), with the source bytes
# (--no-restart-markers) and --max-side 320. Then runs `python -m pipeline.bench` for each decoder and output dtype
# with the torchvision baseline (on the source JPEGs), for the one-core decode path, and at 1 and 2 workers pinned
# to as many cores (taskset). One JSON line per run goes to OUT/host.jsonl.
#
#   bash tools/bench_host.sh DATA_DIR OUT_DIR          # PYTHON=.venv/bin/python by default; SECONDS_PER_RUN=20
#
# The Pillow flavour is whatever the environment has (the "pillow" field of each line says which): run it once
# with Pillow-SIMD (tools/setup.sh's default) and once after `pip install --force-reinstall pillow` to compare.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
[ $# -eq 2 ] || { echo "usage: bash tools/bench_host.sh DATA_DIR OUT_DIR" >&2; exit 2; }
data=$1 out=$2
py=${PYTHON:-.venv/bin/python}
secs=${SECONDS_PER_RUN:-20}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
[ -d "$data/jpeg/train" ] || "$py" "$here/make_sample_data.py" "$data/jpeg" --classes 4 --train-per-class 128 \
    --val-per-class 16 --seed 1
shards() {  # OUT_NAME, then make_shards flags; a rerun of the same settings resumes (finds nothing to do)
    local name=$1; shift
    "$py" "$here/make_shards.py" --data_path "$data/jpeg" --out "$data/$name" --samples-per-shard 128 "$@" >/dev/null
}
shards shards --restart-markers
shards shards-plain --no-restart-markers
shards shards320 --restart-markers --max-side 320

pin=()  # a taskset prefix for the scaling runs
bench() {  # label, then pipeline.bench flags
    local label=$1; shift
    "${pin[@]}" "$py" -m pipeline.bench --batch-size 64 --seconds "$secs" --interval 1000 "$@" 2>/dev/null | tail -1 |
        "$py" -c "import json, sys; d = json.loads(sys.stdin.read()); d['run'] = sys.argv[1]; print(json.dumps(d))" \
        "$label" | tee -a "$out/host.jsonl"
}
for set in "region shards" "region shards-plain" "pillow shards-plain"; do
    read -r decoder shards <<<"$set"
    for dtype in float32 uint8; do
        bench "loader $dtype $decoder $shards" --data_path "$data/$shards" --baseline "$data/jpeg" --workers 2 \
            --dtype "$dtype" --host-decoder "$decoder"
    done
    for split in train val; do
        bench "one core $split $decoder $shards" --data_path "$data/$shards" --decode-only --baseline x \
            --split "$split" --host-decoder "$decoder" --seconds 8
    done
done
for dtype in float32 uint8; do
    bench "loader $dtype region shards320" --data_path "$data/shards320" --baseline "$data/jpeg" --workers 2 \
        --dtype "$dtype"
done
# Scaling over cores: W workers and the main process pinned to W cores, so that one worker is not helped by a core
# that the main process has to itself.
for workers in 1 2; do
    pin=(taskset -c "0-$((workers - 1))")
    bench "scaling uint8 region shards W=$workers on $workers cores" --data_path "$data/shards" --workers "$workers" \
        --dtype uint8
done
