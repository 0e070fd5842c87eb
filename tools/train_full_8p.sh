#!/usr/bin/env bash
# Full training on 8 devices of one node (torchrun, DDP): --epochs (default 8) with eval every epoch and
# checkpoints, like the ModelZoo script of that name. The seed's 80.6-80.8 Acc@1 in 8 epochs was a fine-tune of
# ImageNet-21k weights: pass them with --pretrained PATH (a local file; nothing is downloaded).
#   tools/train_full_8p.sh --data_path=SHARDS [--pretrained PATH] [train.py flags, e.g. --device npu]
# NPROC (8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500) set the torchrun layout.
# Rerunning with --resume auto and the same OUTPUT_DIR continues a killed run from its last checkpoint.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/launch_lib.sh"
parse_launch_args "$@"
run_folder vit_b32_full_8p
torchrun_cmd
"${launcher[@]}" "$root/train.py" --data_path="$data_path" --output "$out" \
  --batch-size 256 --epochs 8 -p 50 \
  "${extra[@]}" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
final_lines "$log" accuracy
exit "$status"
