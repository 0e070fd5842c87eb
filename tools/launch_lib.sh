# Sourced by the ModelZoo-style launch scripts (tools/train_*_{1p,8p}.sh): the seed's --data_path=, the run
# folder, the launcher, and the closing lines that ModelZoo tooling greps.

# parse_launch_args "$@": sets data_path and extra (every other argument, passed on to train.py).
parse_launch_args() {
  data_path="" extra=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --data_path=*) data_path="${1#*=}" ;;
      --data_path) data_path="${2:?--data_path needs a value}"; shift ;;
      -h|--help)  # the script's header comment, as every script in tools/ answers; train.py's flags: train.py -h
        sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'
        echo "Flags after --data_path go to train.py: python train.py -h lists them."
        exit 0 ;;
      *) extra+=("$1") ;;
    esac
    shift
  done
  [ -n "$data_path" ] || { echo "usage: $0 --data_path=SHARDS [train.py flags...]" >&2; exit 2; }
}

# run_folder NAME: sets out (OUTPUT_DIR or output/NAME_<date>) and log, and creates the folder.
run_folder() {
  out="${OUTPUT_DIR:-output/$1_$(date +%Y%m%d_%H%M%S)}"
  mkdir -p "$out"
  log="$out/train.log"
}

# torchrun_cmd: the launcher for NPROC devices; NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set the layout.
torchrun_cmd() {
  launcher=("${PYTHON:-python}" -m torch.distributed.run --nproc_per_node="${NPROC:-8}" --nnodes="${NNODES:-1}"
            --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
            --master_port="${MASTER_PORT:-29500}")
}

# final_lines LOG [accuracy]: the seed's closing lines.
final_lines() {
  local fps acc
  fps=$(grep -a 'FPS@all' "$1" | tail -n 1 | awk -F 'FPS@all ' '{print $2}' | awk '{print $1}')
  echo "Final Performance images/sec : ${fps:-n/a}"
  if [ "${2:-}" = accuracy ]; then
    acc=$(grep -a ' \* Acc@1' "$1" | tail -n 1 | awk -F 'Acc@1 ' '{print $2}' | awk '{print $1}')
    echo "Final Accuracy : ${acc:-n/a}"
  fi
}
