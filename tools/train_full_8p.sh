#!/usr/bin/env bash
# Full training on 8 devices of one node (torchrun, DDP): --epochs (default 8) with eval every epoch and
# checkpoints, like the ModelZoo script of that name. The seed's 80.6-80.8 Acc@1 in 8 epochs was a fine-tune of
# ImageNet-21k weights: pass them with --pretrained PATH (a local file; nothing is downloaded).
#   tools/train_full_8p.sh --data_path=SHARDS [--pretrained PATH] [train.py flags, e.g. --device npu]
# NPROC (8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500) set the torchrun layout.
# Rerunning with --resume auto and the same OUTPUT_DIR continues a killed run from its last checkpoint.
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
out="${OUTPUT_DIR:-output/vit_b32_full_8p_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$out"
log="$out/train.log"

"${PYTHON:-python}" -m torch.distributed.run --nproc_per_node="${NPROC:-8}" --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  "$root/train.py" --data_path="$data_path" --output "$out" --batch-size 256 --epochs 8 -p 50 \
  "${extra[@]}" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}

fps=$(grep -a 'FPS@all' "$log" | tail -n 1 | awk -F 'FPS@all ' '{print $2}' | awk '{print $1}')
acc=$(grep -a ' \* Acc@1' "$log" | tail -n 1 | awk -F 'Acc@1 ' '{print $2}' | awk '{print $1}')
echo "Final Performance images/sec : ${fps:-n/a}"
echo "Final Accuracy : ${acc:-n/a}"
exit "$status"
