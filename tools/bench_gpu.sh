#!/usr/bin/env bash
# The GPU benchmark session, as one script: sample data -> shards -> the pipeline alone (both backends) -> every
# configuration of tools/bench_train.py (baseline, our step, our step fed by DALI and by the host backend), the
# baseline always in the same process. Figures land as JSON lines in RESULTS_DIR; docs/benchmarks.md explains them.
#
# Usage: bash tools/bench_gpu.sh RESULTS_DIR [NUM_IMAGES]        (on a CUDA machine, deps installed)
# Environment: PYTHON, DATA_DIR (/tmp/vitbench), DEVICE (cuda), BATCH_SIZES ("256 512"), SECONDS_PER_RUN (20),
# TRAIN_ARGS (extra tools/bench_train.py flags; a CPU dry run: DEVICE=cpu BATCH_SIZES=8 SECONDS_PER_RUN=2
# TRAIN_ARGS="--model vit_tiny_patch16_224 --img-size 32 --steps 2 --warmup 1 --no-compile").
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/bench_gpu.sh RESULTS_DIR [NUM_IMAGES]}
n=${2:-4096}
py=${PYTHON:-python3}
data=${DATA_DIR:-/tmp/vitbench}
device=${DEVICE:-cuda}
seconds=${SECONDS_PER_RUN:-20}
read -r -a train_args <<<"${TRAIN_ARGS:-}"
mkdir -p "$out"
[ -f "$data/shards/manifest.json" ] || {
  "$py" tools/make_sample_data.py "$data/folder" --classes 16 --train-per-class $((n / 16)) --val-per-class 8
  "$py" tools/make_shards.py --data_path "$data/folder" --out "$data/shards" --samples-per-shard 512
}
cores=$(nproc)
run() { echo "+ $*" >&2; "$py" "$@"; }
# Pipeline alone: how fast each backend delivers batches to the device with no model attached.
for backend in dali host; do
  workers=8; [ "$backend" = host ] && workers=$cores
  run -m pipeline.bench --data_path "$data/shards" --backend "$backend" --batch-size 256 --workers "$workers" \
    --seconds "$seconds" --interval "$seconds" --device "$device" --dtype uint8 | tail -n 1 >>"$out/pipeline.jsonl"
done
# The step: (a) timm + compile, (b) ours, (c) ours fed by a backend; one process per configuration.
for bs in ${BATCH_SIZES:-256 512}; do
  run tools/bench_train.py --device "$device" --batch-size "$bs" --compile --backend dali --data_path "$data/shards" \
    --workers 8 "${train_args[@]}" --out "$out/train.jsonl"
done
run tools/bench_train.py --device "$device" --batch-size "${BATCH_SIZES%% *}" --compile --backend host \
  --data_path "$data/shards" --workers "$cores" --loops b,c "${train_args[@]}" --out "$out/train.jsonl"
echo "results in $out" >&2
