#!/usr/bin/env bash
# The GPU benchmark session, as one script: sample data -> shards -> every configuration of tools/bench_train.py
# (baseline, our step, our step fed by DALI and by the host backend) and the pipeline-alone figures, with the
# baseline in the same run. Figures land as JSON lines in RESULTS_DIR; docs/benchmarks.md explains them.
#
# Usage: bash tools/bench_gpu.sh RESULTS_DIR [NUM_IMAGES]        (on a CUDA machine, deps installed)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/bench_gpu.sh RESULTS_DIR [NUM_IMAGES]}
n=${2:-4096}
py=${PYTHON:-python3}
mkdir -p "$out"
data=${DATA_DIR:-/tmp/vitbench}
per_class=$((n / 16))
[ -f "$data/shards/manifest.json" ] || {
  "$py" tools/make_sample_data.py "$data/folder" --classes 16 --train-per-class "$per_class" --val-per-class 8
  "$py" tools/make_shards.py --data_path "$data/folder" --out "$data/shards" --samples-per-shard 512
}
cores=$(nproc)
run() { echo "+ $*" >&2; "$py" "$@"; }
# Pipeline alone: how fast each backend delivers batches to the GPU with no model attached.
run -m pipeline.bench --data_path "$data/shards" --backend dali --batch-size 256 --workers 8 --seconds 20 \
  --device cuda | tail -n 1 >>"$out/pipeline.jsonl"
run -m pipeline.bench --data_path "$data/shards" --backend host --batch-size 256 --workers "$cores" --seconds 20 \
  --device cuda | tail -n 1 >>"$out/pipeline.jsonl"
# The step: (a) timm + compile, (b) ours, (c) ours fed by a backend; one process per configuration.
for bs in 256 512; do
  run tools/bench_train.py --batch-size "$bs" --compile --backend dali --data_path "$data/shards" --workers 8 \
    --out "$out/train.jsonl"
done
run tools/bench_train.py --batch-size 256 --compile --backend host --data_path "$data/shards" --workers "$cores" \
  --loops b,c --out "$out/train.jsonl"
echo "results in $out" >&2
