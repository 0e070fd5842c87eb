#!/usr/bin/env bash
# The GPU benchmark session as one script, most important figures first, inside a time budget:
#   data    realistic sample JPEGs -> shards (with restart markers where the region decoder is built), a second
#           set re-encoded to --max-side MAX_SIDE and a third with the source bytes (--no-restart-markers) (skipped when
#           they exist; DATA_ONLY=1 stops here, so data can be made while the rest is being set up);
#   tests   pytest -m gpu (CUDA paths of both backends, FP8 on CUDA vs CPU);
#   train   train.py end to end on the GPU with the dali backend (eager, 2 epochs, eval): it runs, logs FPS, Acc@1;
#   step    tools/bench_train.py per batch size: (a) timm baseline, (b) ours, (c) ours fed by DALI, (b) again (drift),
#           (d) FP8, (e) the DeiT recipe's mixup/cutmix/erasing/EMA (recipe_cost), the baseline always in the
#           same process; the first batch size also feeds DALI with every JPEG
#           on the hardware decoder, the host backend from the original and the --max-side shards, and DALI over
#           three epochs (its per-epoch restarts included) with and without the next pipeline built ahead, and
#           DALI with --aa rand-m9-mstd0.5-inc1 and ta_wide (the augmentation issue's fed-step figure);
#   alone   python -m pipeline.bench: each backend with no model attached, DALI and the host backend also on the
#           shards with the source bytes (what restart markers cost or give each);
#   profile tools/profile_step.py: kernel time by category for (a) and (b), into RESULTS_DIR/profile.json;
#   sides   tools/bench_train.py at 128, 160 and 192 px (the steps of a --min-res schedule; 224 is the step stage's),
#           timm's baseline and ours, synthetic and fed by DALI, and (f) the model of 224 px resampling its position
#           embedding every forward (dynamic_cost: what train.py does under --min-res);
#   project tools/project_schedule.py on those figures: an ImageNet run under FFCV's 88-epoch schedule shape at
#           ViT-B/32's sides (160 px to epoch 65, 224 from 76; and from 128 px), DALI-fed, and with train.py's
#           resampling model on synthetic input, against 224 throughout;
#   perf    tools/train_performance_1p.sh --compile --backend dali: the launch script users run.
# Every figure is a JSON line in RESULTS_DIR/results.jsonl; every command's output goes to RESULTS_DIR/log.txt;
# stages that would start past BUDGET_S seconds are skipped (and say so).
#
# Usage: bash tools/bench_gpu.sh RESULTS_DIR [TRAIN_IMAGES]       (on a CUDA machine, requirements installed)
# Environment: PYTHON (python3), DATA_DIR (/tmp/vitbench), DEVICE (cuda), BATCH_SIZES ("256 512"), BUDGET_S (420),
#   MAX_SIDE (320), HOST_WORKERS (cores - 2: the main process keeps a core for launching kernels), DATA_ONLY,
#   TRAIN_ARGS (extra tools/bench_train.py flags), TRAINPY_ARGS (extra train.py flags, for the train and perf stages),
#   PROFILE_ARGS (extra tools/profile_step.py flags).
#   CPU dry run (DALI's CPU path, tiny model):
#     DEVICE=cpu BATCH_SIZES=16 TRAIN_ARGS="--model vit_tiny_patch16_224 --img-size 32 --steps 2 --warmup 1
#     --no-compile --amp fp32" TRAINPY_ARGS="--model vit_tiny_patch16_224 --img-size 32 -b 16 --max-steps 20
#     --no-compile" PROFILE_ARGS="--model vit_tiny_patch16_224 --img-size 32 --batch-size 16 --no-compile --amp fp32
#     --steps 2 --warmup 1" bash tools/bench_gpu.sh /tmp/r 512
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
# The scripts in tools/ import the packages (pipeline, trainlib, model). tools/setup.sh installs them; a machine
# without a package index (where `pip install -e .` cannot fetch its build backend) finds them from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The host workers' region decoder (pipeline/shards/_jpegregion.c) in place, as `pip install -e .` would build it; without
# a compiler or libjpeg's headers the host backend decodes whole images with Pillow (the bench lines say which).
if ! ${PYTHON:-python3} -c "import pipeline.shards._jpegregion" 2>/dev/null; then
  ${PYTHON:-python3} - <<'PY' || echo "bench_gpu.sh: region decoder not built; the host backend uses Pillow's decode" >&2
import subprocess, sysconfig
out = "pipeline/shards/_jpegregion" + sysconfig.get_config_var("EXT_SUFFIX")
subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-I" + sysconfig.get_paths()["include"], "pipeline/shards/_jpegregion.c",
                "-ljpeg", "-o", out], check=True, capture_output=True)
PY
fi
out=${1:?usage: bash tools/bench_gpu.sh RESULTS_DIR [TRAIN_IMAGES]}
n=${2:-32768}
py=${PYTHON:-python3}
data=${DATA_DIR:-/tmp/vitbench}
device=${DEVICE:-cuda}
budget=${BUDGET_S:-420}
max_side=${MAX_SIDE:-320}
cores=$(nproc)
host_workers=${HOST_WORKERS:-$((cores > 3 ? cores - 2 : 1))}
read -r -a train_args <<<"${TRAIN_ARGS:-}"
read -r -a trainpy_args <<<"${TRAINPY_ARGS:-}"
read -r -a profile_args <<<"${PROFILE_ARGS:-}"
mkdir -p "$out"
results="$out/results.jsonl" log="$out/log.txt"
if [ -e "$results" ]; then  # one run per folder: tools/bench_report.py and the greps below read the whole files
  echo "bench_gpu.sh: $results exists; give a new RESULTS_DIR" >&2
  exit 2
fi
t0=$(date +%s)

# stage NAME CMD...: run CMD (a command or a function of this script) with its output in the log, stopped when the
# budget runs out (SIGINT: loaders close cleanly), skipped when it already has; a failure is recorded, not fatal.
stage() {
  local name=$1 left=$((budget - $(date +%s) + t0)) start rc pid watchdog
  shift
  if [ "$left" -le 0 ]; then
    echo "{\"stage\": \"$name\", \"skipped\": \"budget of ${budget}s spent\"}" | tee -a "$results"
    return
  fi
  echo "+ [$name] $*" | tee -a "$log" >&2
  start=$(date +%s)
  set -m  # background jobs get their own process group, so the watchdog can stop all of a stage's processes
  ("$@") >>"$log" 2>&1 &
  pid=$!
  (sleep "$left"; kill -INT -- "-$pid"; sleep 20; kill -KILL -- "-$pid") >/dev/null 2>&1 &
  watchdog=$!
  wait "$pid"
  rc=$?
  kill -- "-$watchdog" 2>/dev/null
  set +m
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - start))}" | tee -a "$results"
}

make_data() {
  local per=$((n / 16))
  [ -f "$data/shards/manifest.json" ] || {
    "$py" tools/make_sample_data.py "$data/folder" --classes 16 --train-per-class "$per" --val-per-class 16 &&
      "$py" tools/make_shards.py --data_path "$data/folder" --out "$data/shards" --samples-per-shard 1024
  } || return 1
  [ -f "$data/shards-max$max_side/manifest.json" ] ||
    "$py" tools/make_shards.py --data_path "$data/folder" --out "$data/shards-max$max_side" \
      --samples-per-shard 1024 --max-side "$max_side" || return 1
  [ -f "$data/shards-plain/manifest.json" ] ||
    "$py" tools/make_shards.py --data_path "$data/folder" --out "$data/shards-plain" --samples-per-shard 1024 \
      --no-restart-markers
}

bench_train() {  # bench_train BATCH_SIZE [all]: the loops of one batch size, in one process; "all" adds every feed
  local bs=$1 max="$data/shards-max$max_side" feeds=(--feed dali:workers=8)
  # 2026-11-26 on an H100 (docs/benchmarks.md): 4 threads and hw_decoder_load 0 fed worse than 8 threads at 0.65;
  # so: more hardware decoding, and three epochs with their boundaries (one pipeline: no restart), 2 and 4 readers.
  [ "${2:-}" = all ] && feeds+=(--feed dali:workers=8,hw_decoder_load=1,name=dali_hw1
    --feed dali:workers=8,hw_decoder_load=0.8,name=dali_hw08 --feed dali:workers=8,hw_decoder_load=0.9,name=dali_hw09
    --feed "host:workers=$host_workers" --feed "host:workers=$host_workers,data_path=$max,name=host_max$max_side"
    --feed dali:workers=8,name=dali_3epochs,epochs=3
    --feed dali:workers=8,readers=4,name=dali_3epochs_r4,epochs=3
    --feed "hybrid:workers=8,dali_share=0.75,name=hybrid75" --feed "hybrid:workers=8,dali_share=0.6,name=hybrid60"
    --feed dali:workers=8,aa=rand-m9-mstd0.5-inc1,name=dali_randaug --feed dali:workers=8,aa=ta_wide,name=dali_ta)
  "$py" tools/bench_train.py --device "$device" --batch-size "$bs" --compile --fp8 --recipe --recheck \
    --data_path "$data/shards" --warmup 20 --steps 80 "${feeds[@]}" "${train_args[@]}" --out "$results"
}

alone() {  # the pipeline alone: how fast each backend delivers batches with no model attached
  local backend=$1 shards=$2 workers=$3
  "$py" -m pipeline.bench --data_path "$shards" --backend "$backend" --batch-size 256 --workers "$workers" \
    --seconds 8 --interval 8 --device "$device" --dtype uint8 >"$out/alone.txt" || return
  tail -n 1 "$out/alone.txt" >>"$results"
}

project() {  # the ImageNet time of a schedule from the step and sides figures (batch 256, as the sides stage)
  local min loops rc=0
  for min in 160 128; do
    # DALI-fed with the model built at each side; then train.py's model (built at 224, resampling its position
    # embedding: loop f) on synthetic input, ours_synthetic at 224 where f is not run
    for loops in "--loop ours_dali" "--loop ours_dynamic --loop ours_synthetic"; do
      # shellcheck disable=SC2086  # $loops is two or four words on purpose
      "$py" tools/project_schedule.py "$results" $loops --batch-size 256 --min-res "$min" --max-res 224 \
        --start-ramp 65 --end-ramp 76 --epochs 88 >"$out/project.txt" || { rc=1; continue; }
      cat "$out/project.txt"
      tail -n 1 "$out/project.txt" >>"$results"
    done
  done
  return $rc
}

stage data make_data
[ -n "${DATA_ONLY:-}" ] && exit 0
stage env "$py" -c "import json, torch, timm, PIL; import nvidia.dali as d; print(json.dumps({'stage': 'versions',
  'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'torch': torch.__version__,
  'timm': timm.__version__, 'dali': d.__version__, 'pillow': PIL.__version__}))"
grep -a '"stage": "versions"' "$log" | tail -n 1 >>"$results"
stage tests "$py" -m pytest -q -m gpu -p no:cacheprovider tests
stage train "$py" train.py --data_path "$data/shards" --backend dali --device "$device" --epochs 2 --batch-size 256 \
  --workers 8 --eval-freq 1 -p 40 --output /tmp/vitbench-train --no-plots --seed 0 "${trainpy_args[@]}"
grep -a -E 'FPS@all| \* Acc@1' "$log" | tail -n 3 | sed 's/^/    /' >&2
all=all  # the first batch size gets every feed; the others DALI only (GPU minutes are scarce)
for bs in ${BATCH_SIZES:-256 512}; do
  stage "step_bs$bs" bench_train "$bs" $all
  all=
done
stage profile "$py" tools/profile_step.py --device "$device" --batch-size 256 --compile --steps 10 \
  --out "$out/profile.json" "${profile_args[@]}"
stage alone_dali alone dali "$data/shards" 8
stage alone_host alone host "$data/shards" "$host_workers"
stage alone_dali_plain alone dali "$data/shards-plain" 8
stage alone_host_plain alone host "$data/shards-plain" "$host_workers"
stage "alone_host_max$max_side" alone host "$data/shards-max$max_side" "$host_workers"
for side in 128 160 192; do
  stage "side_$side" "$py" tools/bench_train.py --device "$device" --batch-size 256 --compile --img-size "$side" \
    --dynamic-from 224 --data_path "$data/shards" --warmup 20 --steps 80 --feed dali:workers=8 "${train_args[@]}" \
    --out "$results"
done
stage project project
stage perf env OUTPUT_DIR=/tmp/vitbench-perf PYTHON="$py" bash tools/train_performance_1p.sh \
  --data_path="$data/shards" --device "$device" --backend dali --workers 8 --compile "${trainpy_args[@]}"
grep -a 'Final Performance' "$log" | tail -n 1 >&2
echo "results in $results, log in $log ($(($(date +%s) - t0)) s)" >&2
