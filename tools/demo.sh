#!/usr/bin/env bash
# The quick start, on a CPU in a few minutes: make a 10-class sample data set (2,600 train / 200 val JPEGs) in
# data/sample, shard it into data/sample-shards, train a tiny ViT on it with the host (Pillow) pipeline, and print
# the throughput and the accuracy (chance is 10%). Assumes the requirements are installed; PYTHON picks the python.
# Anything after the script name goes to train.py (e.g. --epochs 4, --device cuda).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python}"
mkdir -p output

if [ ! -f data/sample-shards/manifest.json ]; then
  "$py" tools/make_sample_data.py data/sample --classes 10 --train-per-class 260 --val-per-class 20 --seed 0 \
    --min-side 96 --max-side 160
  "$py" tools/make_shards.py --data_path data/sample --out data/sample-shards
fi

# vit_tiny (5.7M parameters) at 64 px: 16 patches per image, so an epoch takes seconds on two cores; eight epochs
# with AdamW and a one-epoch warm-up take it well past 80% Acc@1 on this set.
"$py" train.py --data_path data/sample-shards --backend host --workers 1 --device cpu \
  --model vit_tiny_patch16_224 --img-size 64 --batch-size 64 --epochs 8 --lr 1e-3 --warmup-epochs 1 \
  --eval-freq 2 -p 20 --output output/demo "$@" | tee output/demo.log

echo "demo: $(grep -a 'FPS@all' output/demo.log | tail -n 1), final$(grep -a ' \* Acc@1' output/demo.log | tail -n 1)"
