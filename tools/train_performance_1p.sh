#!/usr/bin/env bash
# Images/sec on ONE device: a short run (500 steps, no eval, no checkpoints), like the ModelZoo script of that name.
#   tools/train_performance_1p.sh --data_path=SHARDS [train.py flags, e.g. --device npu --backend dali --compile]
# Later flags override the defaults below. Log and metrics: output/vit_b32_perf_1p_<date>/ (or $OUTPUT_DIR).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data_path="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data_path=*) data_path="${1#*=}" ;;
    --data_path) data_path="${2:?--data_path needs a value}"; shift ;;
    *) extra+=("$1") ;;
  esac
  shift
done
[ -n "$data_path" ] || { echo "usage: $0 --data_path=SHARDS [train.py flags...]" >&2; exit 2; }
out="${OUTPUT_DIR:-output/vit_b32_perf_1p_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$out"
log="$out/train.log"

"${PYTHON:-python}" "$root/train.py" --data_path="$data_path" --output "$out" \
  --batch-size 256 --epochs 1 --max-steps 500 --warmup-log-steps 50 --eval-freq 0 --no-save-checkpoints -p 20 \
  "${extra[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

fps=$(grep -a 'FPS@all' "$log" | tail -n 1 | awk -F 'FPS@all ' '{print $2}' | awk '{print $1}')
echo "Final Performance images/sec : ${fps:-n/a}"
exit "$status"
