#!/usr/bin/env bash
# The GPU benchmarks in two calls, each under 10 minutes (about 10 in all), the figures most owed first:
#   bash tools/bench_gpu.sh --prepare RESULTS_DIR   call 1: the C extensions and the data (about 1 minute)
#   bash tools/bench_gpu.sh RESULTS_DIR             call 2: the figures, inside BUDGET_S (550 s)
#   bash tools/bench_gpu.sh --dry-run               both calls' stages, their order and estimated seconds; runs nothing
# Give each call its own RESULTS_DIR; the data (DATA_DIR, outside the repository) is what call 2 takes from call 1.
#
# Call 1 (--prepare):
#   build    pyproject.toml's ext-modules compiled in place, as `pip install -e .` would (a GPU machine may have a
#            compiler but no package index): the region decoder (-ljpeg), the pixel kernels, the augmentation ops;
#   data     realistic sample JPEGs, 16 classes x TRAIN_PER_CLASS (400) = 6,400 train images: 25 steps per epoch at
#            batch 256, so that a feed spans three epochs (its boundaries included) in ~75 steps, ~2.5 s of step
#            time, and an epoch of train.py is seconds. Sharded three ways: with restart markers (the region decoder
#            is built first, so make_shards adds them), re-encoded to --max-side MAX_SIDE, and with the source bytes
#            (--no-restart-markers): what the markers cost or give each backend. Skipped where they exist;
#   versions python, torch, timm, DALI, Pillow and the GPU, kept in DATA_DIR for call 2: it also says, before call 2
#            spends its minutes, whether DALI imports.
# Call 2 (RESULTS_DIR), a stage starting only when its estimate fits in what is left of BUDGET_S:
#   tests      pytest -m gpu tests (CUDA paths of both backends, FP8 on CUDA, the batch augmentation's copies);
#   feed_*     tools/bench_train.py, (b) ours on synthetic input against (c) ours fed, each feed over three epochs,
#              one process per group so that each group's summary lines are written when it ends: DALI plain, with
#              --aa rand-m9-mstd0.5-inc1 and ta_wide; hybrid (DALI and host workers) at two shares; then
#              python -m pipeline.bench with DALI and a --min-res schedule (the side changes after epoch 0) behind a
#              stand-in step as long as (b)'s: what a side change costs at the epoch boundary (boundary_wait_s);
#   step_*     tools/bench_train.py (a) timm's baseline and (b) ours with --compile, (e) the DeiT recipe's
#              mixup/cutmix/erasing/EMA (recipe_cost) and (b) again (drift); then (a) and (b) eager;
#   train_minres  train.py end to end with DALI over 2 epochs, 160 px then 224 (--min-res ... --start-ramp 0
#              --end-ramp 1), evaluated after each; its summary.json becomes a line of results.jsonl;
#   profile    tools/profile_step.py: kernel time by category for (a) and (b), into RESULTS_DIR/profile.json;
#   alone_*    python -m pipeline.bench: each backend with no model, from each shard set;
#   side_*     tools/bench_train.py at SIDES (the steps of a --min-res schedule), the baseline, ours synthetic and
#              DALI-fed, and (f) the model of MAX_RES px resampling its position embedding every forward;
#   project    tools/project_schedule.py: an ImageNet run under FFCV's 88-epoch schedule shape at ViT-B/32's sides;
#   perf       tools/train_performance_1p.sh --compile --backend dali: the launch script users run (500 steps);
#   feed_more  the host backend fed from both shard sets, DALI with more hardware decoding, 4 readers, and without
#              the decoders' ImageNet-sized scratch (--no-dali-preallocate).
# Every figure is a JSON line in RESULTS_DIR/results.jsonl, written as each stage (or feed group) ends, with
# tools/bench_report.py's tables redone into RESULTS_DIR/report.md after every stage: a call stopped early keeps
# what it measured. Every command's output goes to RESULTS_DIR/log.txt. A stage still running at BUDGET_S is
# stopped (SIGINT, then SIGKILL 20 s later): 550 s leaves a 10-minute call half a minute to spare.
#
# Environment: PYTHON (python3; PYTHONPATH is honoured, the checkout put first), DATA_DIR (/tmp/vitbench), DEVICE
#   (cuda), BATCH (256), BUDGET_S (550, each call), TRAIN_PER_CLASS (400), MAX_SIDE (320), MIN_RES / MAX_RES (160 /
#   224: train_minres and the side change), SIDES ("160 128 192"), HOST_WORKERS (cores - 2: the main process keeps a
#   core for launching kernels), TRAIN_ARGS (extra tools/bench_train.py flags), TRAINPY_ARGS (extra train.py flags,
#   for train_minres and perf), PROFILE_ARGS (extra tools/profile_step.py flags).
#   A CPU check of both calls (DALI's CPU path, a tiny model, 128 images; under 5 minutes on two cores; project
#   finds no ViT-B/32 figures there and says so, rc 1):
#     export DEVICE=cpu BATCH=16 TRAIN_PER_CLASS=8 MIN_RES=32 MAX_RES=64 SIDES=32 BUDGET_S=3600 DATA_DIR=SCRATCH
#     export TRAIN_ARGS="--model vit_tiny_patch16_224 --img-size 32 --steps 2 --warmup 1 --no-compile --amp fp32"
#     export TRAINPY_ARGS="--model vit_tiny_patch16_224 --img-size 64 --max-steps 20 --no-compile"
#     export PROFILE_ARGS="--model vit_tiny_patch16_224 --img-size 32 --no-compile --amp fp32 --steps 2 --warmup 1"
#     bash tools/bench_gpu.sh --prepare OUT1 && bash tools/bench_gpu.sh OUT2
set -uo pipefail
mode=figures
case "${1:-}" in
  -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  --dry-run) mode=dry ;;
  --prepare) mode=prepare; shift ;;
  -*) echo "bench_gpu.sh: unknown option $1 (-h lists them)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
# The scripts in tools/ import the packages (pipeline, trainlib, model). tools/setup.sh installs them; a machine
# without a package index (where `pip install -e .` cannot fetch its build backend) finds them from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
data=${DATA_DIR:-/tmp/vitbench}
device=${DEVICE:-cuda}
batch=${BATCH:-256}
budget=${BUDGET_S:-550}
per_class=${TRAIN_PER_CLASS:-400}
max_side=${MAX_SIDE:-320}
min_res=${MIN_RES:-160} max_res=${MAX_RES:-224}
cores=$(nproc)
host_workers=${HOST_WORKERS:-$((cores > 3 ? cores - 2 : 1))}
read -r -a train_args <<<"${TRAIN_ARGS:-}"
read -r -a trainpy_args <<<"${TRAINPY_ARGS:-}"
read -r -a profile_args <<<"${PROFILE_ARGS:-}"
dry= call= planned=0 ran=  # ran: the stages started (under --dry-run: planned), for those that need another's lines
if [ "$mode" = dry ]; then
  dry=1 out=RESULTS_DIR
else
  if [ $# -ne 1 ]; then
    echo "usage: bash tools/bench_gpu.sh [--prepare] RESULTS_DIR, or --dry-run (-h says more)" >&2
    exit 2
  fi
  out=$1
  if [ "$mode" = figures ] && [ ! -f "$data/shards/manifest.json" ]; then
    echo "bench_gpu.sh: no shards in $data; run bash tools/bench_gpu.sh --prepare RESULTS_DIR first" >&2
    exit 2
  fi
  mkdir -p "$out"
fi
results="$out/results.jsonl" log="$out/log.txt"
if [ -z "$dry" ] && [ -e "$results" ]; then  # one call per folder: tools/bench_report.py reads the whole file
  echo "bench_gpu.sh: $results exists; give a new RESULTS_DIR" >&2
  exit 2
fi
t0=$(date +%s)

# stage NAME ESTIMATE_S CMD...: run CMD (a command or a function of this script) with its output in the log, if its
# estimate fits in what is left of the budget (a stage that cannot finish would only be stopped, and a later,
# shorter one may still fit); stopped when the budget runs out (SIGINT: loaders close cleanly); a failure is
# recorded, not fatal. Under --dry-run: one line of the plan, by the same rule, from the estimates alone.
stage() {
  local name=$1 est=$2 left rc pid watchdog start
  shift 2
  if [ -n "$dry" ]; then
    if [ "$est" -le $((budget - planned)) ]; then
      printf '%-8s %-20s %5s %5s  run   %s\n' "$call" "$name" "$est" "$planned" "$*"
      planned=$((planned + est)) ran+=" $name"
    else
      skip "$name" "$est" "$*"
    fi
    return
  fi
  left=$((budget - $(date +%s) + t0))
  if [ "$left" -lt "$est" ]; then
    skip "$name" "$est" "needs ~${est}s, ${left}s of BUDGET_S=$budget left"
    return
  fi
  ran+=" $name"
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
  # The tables so far, so that a call stopped at any point leaves them (exit 1: no figures yet, nothing written)
  "$py" tools/bench_report.py "$results" --markdown >"$out/report.md.tmp" 2>/dev/null &&
    mv "$out/report.md.tmp" "$out/report.md"
  rm -f "$out/report.md.tmp"
}

skip() {  # skip NAME ESTIMATE_S WHY: the line of a stage that does not run
  if [ -n "$dry" ]; then
    printf '%-8s %-20s %5s %5s  skip  %s\n' "$call" "$1" "$2" - "$3"
  else
    echo "{\"stage\": \"$1\", \"skipped\": \"$3\"}" | tee -a "$results"
  fi
}

build_extensions() {  # build_extensions all|missing: pyproject.toml's ext-modules in place, one JSON line each
  "$py" - "$1" <<'PY'
import json, os, shlex, shutil, subprocess, sys, sysconfig, time
try:
    import tomllib  # Python 3.11+
except ImportError:
    sys.exit("bench_gpu.sh: reading pyproject.toml needs Python 3.11's tomllib; the C extensions are not built")
KEYS = {"name", "sources", "libraries", "extra-compile-args", "extra-link-args", "include-dirs", "library-dirs",
        "optional"}
suffix, failed = sysconfig.get_config_var("EXT_SUFFIX"), 0
cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
cc = cc if shutil.which(cc[0]) else ["cc"]
# setuptools compiles with the interpreter's CFLAGS; where they do not suit this compiler, plain flags still build
flag_sets = {"python": shlex.split(sysconfig.get_config_var("CFLAGS") or "") + ["-fPIC"], "plain": ["-O2", "-fPIC"]}
with open("pyproject.toml", "rb") as f:
    extensions = tomllib.load(f)["tool"]["setuptools"]["ext-modules"]
for ext in extensions:
    out = ext["name"].replace(".", "/") + suffix
    if sys.argv[1] == "missing" and os.path.exists(out):
        continue
    line, start = {"extension": ext["name"], "built": False}, time.time()
    if set(ext) - KEYS:  # a key this builder does not know would be a silently different build
        line["error"] = f"pyproject.toml keys not handled here: {sorted(set(ext) - KEYS)}"
    else:
        tmp = f"{out[:-len(suffix)]}.{os.getpid()}.tmp.so"  # no module's name; *.so, so git ignores a leftover
        for flags_name, flags in flag_sets.items():
            cmd = [*cc, *flags, "-I" + sysconfig.get_paths()["include"],
                   *("-I" + d for d in ext.get("include-dirs", [])), *ext.get("extra-compile-args", []),
                   *ext["sources"], "-shared", *("-L" + d for d in ext.get("library-dirs", [])),
                   *ext.get("extra-link-args", []), *("-l" + lib for lib in ext.get("libraries", [])), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, out)  # the module appears whole or not at all
                line.update(built=True, flags=flags_name)
                break
            line["error"] = (done.stderr.strip().splitlines() or ["rc %d" % done.returncode])[-1]
        if line["built"]:
            line.pop("error", None)
    line["seconds"] = round(time.time() - start, 1)
    failed += not line["built"]
    print(json.dumps(line), flush=True)
sys.exit(1 if failed else 0)
PY
}

built() {  # built all|missing: build_extensions with its lines also in results.jsonl
  build_extensions "$1" | tee -a "$results"
}

make_data() {
  # The shards' manifest is written last: without it the sample folder may be half made, so it is made again.
  [ -f "$data/shards/manifest.json" ] || {
    "$py" tools/make_sample_data.py "$data/folder" --classes 16 --train-per-class "$per_class" --val-per-class 16 \
      --workers "$cores" --overwrite &&
      "$py" tools/make_shards.py --data_path "$data/folder" --out "$data/shards" --samples-per-shard 256
  } || return 1
  # 256 samples a shard: 25 train shards, enough to spread over DALI's readers and the host workers
  [ -f "$data/shards-max$max_side/manifest.json" ] ||
    "$py" tools/make_shards.py --data_path "$data/folder" --out "$data/shards-max$max_side" \
      --samples-per-shard 256 --max-side "$max_side" || return 1
  [ -f "$data/shards-plain/manifest.json" ] ||
    "$py" tools/make_shards.py --data_path "$data/folder" --out "$data/shards-plain" --samples-per-shard 256 \
      --no-restart-markers
}

versions() {  # one JSON line, into results.jsonl and DATA_DIR (call 2 copies it from there)
  "$py" -c "import json, torch, timm, PIL; import nvidia.dali as d; print(json.dumps({'stage': 'versions',
    'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'torch': torch.__version__,
    'timm': timm.__version__, 'dali': d.__version__, 'pillow': PIL.__version__}))" >"$out/versions.json" || return
  cat "$out/versions.json" >>"$results"
  cp "$out/versions.json" "$data/versions.json"
}

gpu_tests() {  # the whole suite collected, as a user's run would be: its optional packages skip, not stop, it
  "$py" -m pytest -q -m gpu -p no:cacheprovider tests
}

bench_train() {  # bench_train FLAGS...: one tools/bench_train.py process at BATCH; its lines go to results.jsonl
  "$py" tools/bench_train.py --device "$device" --batch-size "$batch" --data_path "$data/shards" --warmup 20 \
    --steps 80 "$@" "${train_args[@]}" --out "$results"
}

alone() {  # alone BACKEND SHARDS WORKERS [FLAGS...]: batches with no model attached (or behind a stand-in step)
  local backend=$1 shards=$2 workers=$3
  shift 3
  "$py" -m pipeline.bench --data_path "$shards" --backend "$backend" --batch-size "$batch" --workers "$workers" \
    --seconds 8 --interval 8 --device "$device" --dtype uint8 "$@" >"$out/alone.txt" || return
  tail -n 1 "$out/alone.txt" >>"$results"
}

train_minres() {  # train.py with the side changing between its two epochs; its summary as a results.jsonl line
  local run="$out/train-minres"
  "$py" train.py --data_path "$data/shards" --backend dali --device "$device" --epochs 2 --batch-size "$batch" \
    --workers 8 --img-size "$max_res" --min-res "$min_res" --max-res "$max_res" --start-ramp 0 --end-ramp 1 \
    --eval-freq 1 -p 5 --output "$run" --no-plots --no-save-checkpoints --seed 0 "${trainpy_args[@]}" || return
  "$py" -c 'import json, sys; print(json.dumps({"train": "train_minres", **json.load(open(sys.argv[1]))}))' \
    "$run/summary.json" >>"$results"
}

project() {  # the ImageNet time of a schedule from the step and sides figures
  local min loops rc=0
  for min in 160 128; do
    # DALI-fed with the model built at each side; then train.py's model (built at 224, resampling its position
    # embedding: loop f) on synthetic input, ours_synthetic at 224 where f is not run
    for loops in "--loop ours_dali" "--loop ours_dynamic --loop ours_synthetic"; do
      # shellcheck disable=SC2086  # $loops is two or four words on purpose
      "$py" tools/project_schedule.py "$results" $loops --batch-size "$batch" --min-res "$min" --max-res 224 \
        --start-ramp 65 --end-ramp 76 --epochs 88 >"$out/project.txt" || { rc=1; continue; }
      cat "$out/project.txt"
      tail -n 1 "$out/project.txt" >>"$results"
    done
  done
  return $rc
}

show() {  # show PATTERN: the log's last lines matching PATTERN, on the terminal
  [ -n "$dry" ] || grep -a -E "$1" "$log" 2>/dev/null | tail -n 3 | sed 's/^/    /' >&2
}

# Estimates (seconds) come from the 2026-11-26 H100 run (docs/benchmarks.md; stage seconds in
# docs/results/h100-2026-11-26.jsonl), scaled to this data set, where a stage ran then; by reasoning where not.
# Measured then: a bench_train.py process starts in ~10 s, each compiled model costs ~35 s (step_bs512: 140 s for
# three compiled models, 23 s of timed loops and one DALI feed), a DALI feed ~5 s to build, the step ~9,000 img/s.
prepare_call() {
  call=prepare
  # Three small C files: 3 s on the two-core development machine
  stage build 10 built all
  # 2.2 min in 2026-11-26 for 33,024 images (made by 2 processes) and two shard sets; a fifth of the images, made
  # by every core, and a third set
  stage data 45 make_data
  stage versions 10 versions  # 9 s in 2026-11-26 (stage env)
}

figures_call() {
  call=figures
  # Not run through in 2026-11-26 (its collection failed after 13 s); a few GPU tests on small shard sets
  stage tests 60 gpu_tests
  # 10 + 35 + (b) twice ~6 + three feeds of 95 steps, each ~12 s with its pipeline
  stage feed_dali 90 bench_train --loops b,c --compile --recheck --feed dali:workers=8,epochs=3 \
    --feed dali:workers=8,epochs=3,aa=rand-m9-mstd0.5-inc1,name=dali_randaug \
    --feed dali:workers=8,epochs=3,aa=ta_wide,name=dali_ta
  # As feed_dali, two feeds that also start the host workers
  stage feed_hybrid 80 bench_train --loops b,c --compile --recheck \
    --feed hybrid:workers=8,dali_share=0.75,epochs=3,name=hybrid75 \
    --feed hybrid:workers=8,dali_share=0.6,epochs=3,name=hybrid60
  # tools/bench_train.py's feeds take no --min-res schedule (their step is built for one side), so the side change
  # is timed here on the pipeline, behind a stand-in step of (b)'s 29 ms at batch 256, and end to end in
  # train_minres. Each alone stage took 18-20 s in 2026-11-26 (8 s measured)
  stage feed_side_change 20 alone dali "$data/shards" 8 --img-size "$max_res" --min-res "$min_res" \
    --max-res "$max_res" --start-ramp 0 --end-ramp 1 --step-ms $((batch * 29 / 256))
  # 10 + three compiled models (a, b, e) ~105 + five timed loops of 100 steps ~15
  stage "step_bs$batch" 130 bench_train --loops a,b --compile --recipe --recheck
  # Eager: 10 + three loops of 100 steps at ~6,700 img/s (train.py's eager figure)
  stage "step_bs${batch}_eager" 25 bench_train --loops a,b --no-compile --recheck
  # 41 s in 2026-11-26 for 2 epochs of 128 steps and their evaluations; now 2 x 25 steps
  stage train_minres 30 train_minres
  show 'FPS@all| \* Acc@1'
  # Not run before: 10 + two compiled models ~70 + 2 x 10 profiled steps
  stage profile 90 "$py" tools/profile_step.py --device "$device" --batch-size "$batch" --compile --steps 10 \
    --out "$out/profile.json" "${profile_args[@]}"
  # 18-20 s each in 2026-11-26
  stage alone_host 20 alone host "$data/shards" "$host_workers"
  stage alone_dali_plain 20 alone dali "$data/shards-plain" 8
  stage alone_host_plain 20 alone host "$data/shards-plain" "$host_workers"
  stage alone_dali 20 alone dali "$data/shards" 8
  stage "alone_host_max$max_side" 20 alone host "$data/shards-max$max_side" "$host_workers"
  # Not run before: 10 + three compiled models (a, b, f) ~105 + a DALI feed and four timed loops ~25
  for side in ${SIDES:-160 128 192}; do
    stage "side_$side" 140 bench_train --compile --img-size "$side" --dynamic-from "$max_res" --feed dali:workers=8
  done
  # Four projections from the lines above, no torch; without a side stage's figures there is nothing to project
  if [[ "$ran" == *" side_"* ]]; then stage project 5 project; else skip project 5 "no side stage ran"; fi
  # 10 + one compiled model 35 + 500 steps ~15 + a DALI pipeline and its start; stopped at 12 s in 2026-11-26.
  # --epochs: as many as the script's 500 steps take here (25 steps an epoch at batch 256)
  stage perf 75 env OUTPUT_DIR="$out/perf" PYTHON="$py" bash tools/train_performance_1p.sh \
    --data_path="$data/shards" --device "$device" --backend dali --workers 8 --compile --batch-size "$batch" \
    --epochs $(((500 * batch + 16 * per_class - 1) / (16 * per_class))) "${trainpy_args[@]}"
  show 'Final Performance'
  # As feed_dali, with five feeds (the host ones start their workers; dali_nopre: the train decoder without
  # ImageNet-sized scratch, docs/dali.md "Decoder memory")
  stage feed_more 110 bench_train --loops b,c --compile --feed "host:workers=$host_workers" \
    --feed "host:workers=$host_workers,data_path=$data/shards-max$max_side,name=host_max$max_side" \
    --feed dali:workers=8,hw_decoder_load=1,name=dali_hw1 --feed dali:workers=8,readers=4,name=dali_r4 \
    --feed dali:workers=8,preallocate=0,name=dali_nopre
}

case $mode in
  dry)
    echo "# call    stage                est_s  at_s  plan  command (DATA_DIR=$data, BATCH=$batch, BUDGET_S=$budget each)"
    prepare_call
    prepared=$planned planned=0
    figures_call
    echo "# prepare $prepared s; figures $planned s of BUDGET_S=$budget (stages marked skip run only if earlier ones" \
      "finish early); both $((prepared + planned)) s"
    ;;
  prepare)
    mkdir -p "$data"
    prepare_call
    ;;
  figures)
    # Call 1's lines where this machine still has them; else made here, inside the budget
    if [ -f "$data/versions.json" ]; then cat "$data/versions.json" >>"$results"; else stage versions 10 versions; fi
    # A checkout copied afresh over kept build outputs has them; a C extension missing is built (seconds)
    built missing >>"$log" 2>&1
    figures_call
    ;;
esac
[ -n "$dry" ] || echo "results in $results, log in $log ($(($(date +%s) - t0)) s)" >&2
