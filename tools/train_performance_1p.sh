#!/usr/bin/env bash
# Images/sec on ONE device: a short run (500 steps, no eval, no checkpoints), like the ModelZoo script of that name.
#   tools/train_performance_1p.sh --data_path=SHARDS [train.py flags]
# e.g. on a GPU --backend dali --compile; on an Ascend NPU --device npu --compile (TorchAir's backend, which
# ships inside torch_npu; DALI is CUDA-only, so the NPU keeps the host backend).
# Later flags override the defaults below. Log and metrics: output/vit_b32_perf_1p_<date>/ (or $OUTPUT_DIR).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/launch_lib.sh"
parse_launch_args "$@"
run_folder vit_b32_perf_1p
launcher=("${PYTHON:-python}")
"${launcher[@]}" "$root/train.py" --data_path="$data_path" --output "$out" \
  --batch-size 256 --epochs 1 --max-steps 500 --warmup-log-steps 50 --eval-freq 0 --no-save-checkpoints -p 20 \
  "${extra[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
final_lines "$log"
exit "$status"
