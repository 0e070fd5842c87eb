#!/usr/bin/env bash
# Images/sec on 8 devices of one node (torchrun, DDP): a short run (500 steps, no eval, no checkpoints), like the
# ModelZoo script of that name. FPS is global: all ranks' images per second.
#   tools/train_performance_8p.sh --data_path=SHARDS [train.py flags]
# e.g. on GPUs --backend dali --compile; on Ascend NPUs --device npu --compile (TorchAir's backend, which
# ships inside torch_npu; DALI is CUDA-only, so NPUs keep the host backend).
# NPROC (8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500) set the torchrun layout.
# Later flags override the defaults below. Log and metrics: output/vit_b32_perf_8p_<date>/ (or $OUTPUT_DIR).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/launch_lib.sh"
parse_launch_args "$@"
run_folder vit_b32_perf_8p
torchrun_cmd
"${launcher[@]}" "$root/train.py" --data_path="$data_path" --output "$out" \
  --batch-size 256 --epochs 1 --max-steps 500 --warmup-log-steps 50 --eval-freq 0 --no-save-checkpoints -p 20 \
  "${extra[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
final_lines "$log"
exit "$status"
