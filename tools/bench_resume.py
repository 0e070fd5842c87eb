"""Benchmark: what a resume mid-epoch costs, in memory (a whole train.py run) and in time (the loader alone).

    python tools/bench_resume.py memory --work DIR [--repo PATH] [--repeats 3]
    python tools/bench_resume.py loader --work DIR [--repeats 5]

Both make their data once in DIR (tools/make_sample_data.py, then tools/make_shards.py: by default 8 classes x 192
train images, 96-160 px, 12 train shards of 128) and reuse it while its settings match.
`memory` runs a train.py on 2 CPU ranks that stops inside epoch 0, resumes it on 1 rank and samples the resumed
process tree's memory (RSS, PSS, /dev/shm slots, decode workers). `--repo` (default: this checkout) picks the
train.py and pipeline/ that run, so one copy of this script measures two checkouts on the same data and flags.
`loader` times `state_dict()` and the first batch after `load_state_dict()` of this checkout's loader, in this
process. pipeline/bench/resume.py says what each reported figure holds, pipeline/bench/memory.py what a sample reads.

Output: one JSON object on stdout (settings, the checkout's commit, machine notes, each repetition, the summary:
median [min, max] over --repeats); a short table on stderr. `--json FILE` also writes the object to FILE.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.bench import resume

HERE = Path(__file__).resolve().parent.parent


def ensure_data(args) -> Path:
    """DIR/shards, made with this checkout's tools unless DIR already holds a set made with the same settings
    (DIR/data.json records them)."""
    work = Path(args.work).resolve()
    shards, stamp = work / "shards", work / "data.json"
    want = {"classes": args.classes, "train_per_class": args.train_per_class, "val_per_class": 4,
            "min_side": 96, "max_side": 160, "samples_per_shard": args.samples_per_shard, "seed": 0}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (shards / "manifest.json").is_file():
        return shards
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "images", ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    resume.run_checked([sys.executable, str(HERE / "tools" / "make_sample_data.py"), str(work / "images"),
                        "--classes", str(want["classes"]), "--train-per-class", str(want["train_per_class"]),
                        "--val-per-class", str(want["val_per_class"]), "--seed", "0",
                        "--min-side", str(want["min_side"]), "--max-side", str(want["max_side"]), "--workers", "2"],
                       env)
    resume.run_checked([sys.executable, str(HERE / "tools" / "make_shards.py"), "--data_path", str(work / "images"),
                        "--out", str(shards), "--samples-per-shard", str(want["samples_per_shard"]),
                        "--workers", "2"], env)
    stamp.write_text(json.dumps(want))
    return shards


def memory_mode(args) -> dict:
    repo, shards = Path(args.repo).resolve(), ensure_data(args)
    runs = []
    for rep in range(args.repeats):
        runs.append(resume.resume_once(args, repo, shards, rep))
        print(f"bench_resume.py: memory {rep + 1}/{args.repeats}: rss peak {mb(runs[-1]['rss_peak'])} MB, "
              f"workers at peak {runs[-1]['workers_at_peak']}", file=sys.stderr)
    return {"mode": "memory", **header(args, repo, shards), "runs": runs,
            "summary": resume.summary(runs, resume.MEMORY_KEYS)}


def loader_mode(args) -> dict:
    shards = ensure_data(args)
    figures = resume.loader_figures(shards, batch_size=args.batch_size, workers=args.workers,
                                    img_size=args.img_size, repeats=args.repeats, calls=args.calls,
                                    settle=args.settle)
    return {"mode": "loader", **header(args, HERE, shards), **figures}


def header(args, repo: Path, shards: Path) -> dict:
    def git(*cmd):
        proc = subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    diff = git("diff", "HEAD")
    return {"repo": str(repo), "commit": git("rev-parse", "HEAD"),
            "modified_files": None if status is None else len(status.splitlines()),
            "diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
            "settings": vars(args),
            "data": json.loads((shards.parent / "data.json").read_text()),
            "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                        "python": platform.python_version(), "platform": platform.platform(),
                        "loadavg_at_end": os.getloadavg(), "mem_total_kb": meminfo("MemTotal")}}


def meminfo(key: str) -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


# The table's rows are the named figures of resume.MEMORY_FIGURES / LOADER_FIGURES; these memory ones are no bytes.
COUNTS = {"workers_at_peak", "workers_max", "shm_files_max", "rest_s", "resume_s", "sampler_cpu_s"}


def table(result: dict) -> str:
    def row(name, key, fmt):
        v = result["summary"].get(key)
        return f"  {name:<34} " + ("-" if v is None else f"{fmt(v['median'])}  [{fmt(v['min'])}, {fmt(v['max'])}]")

    def size(v):
        return f"{mb(v)} MB"

    def num(v):
        return f"{v:g}"

    out = [f"{result['mode']}: {result['repo']} @ {(result['commit'] or '?')[:10]}"
           f"{' (+%d modified)' % result['modified_files'] if result['modified_files'] else ''}, "
           f"{len(result['runs'])} repetitions, median [min, max]"]
    if result["mode"] == "memory":
        out += [row(name, key, num if key in COUNTS else size) for name, key in resume.MEMORY_FIGURES if name]
    else:
        out.append(f"  state_dict(): {result['state_dict_calls']} calls per figure, "
                   f"{result['state_dict_pickled_bytes']} bytes pickled")
        out += [row(name, key, num) for name, key in resume.LOADER_FIGURES if name]
        out.append(f"  resumed first batch = the batch after the state: {result['resumed_first_batch_matches']}")
    foreign = sorted({n for r in result["runs"] for n in r.get("foreign_vitpipe_files", ())})
    if foreign:
        out.append(f"  note: {len(foreign)}+ vitpipe files of other processes were seen (not counted)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="`bench_resume.py MODE -h` lists each mode's flags.")
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", required=True, help="folder for the sample data, its shards and the run folders")
    common.add_argument("--label", default=None, help="a name for this checkout in run folder names")
    common.add_argument("--classes", type=int, default=8, help="sample data: classes")
    common.add_argument("--train-per-class", type=int, default=192, help="sample data: train images per class")
    common.add_argument("--samples-per-shard", type=int, default=128, help="shards: samples per shard")
    common.add_argument("--batch-size", type=int, default=32, help="per rank, in both runs")
    common.add_argument("--workers", type=int, default=2, help="host decode processes per rank")
    common.add_argument("--img-size", type=int, default=64, help="train side")
    common.add_argument("--json", default=None, help="also write the JSON object to this file")
    mem = sub.add_parser("memory", parents=[common], help="RSS/PSS and /dev/shm of an elastic resume (2 -> 1 rank)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mem.add_argument("--repo", default=str(HERE), help="the checkout whose train.py / pipeline/ is measured")
    mem.add_argument("--repeats", type=int, default=3)
    mem.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    mem.add_argument("--epochs", type=int, default=2, help="the run's epochs (1: the resume is the rest of epoch 0)")
    mem.add_argument("--stop-step", type=int, default=8,
                     help="the 2-rank run stops (checkpoint) after this many global steps, inside epoch 0")
    mem.add_argument("--interval-ms", type=float, default=50.0, help="sampling period")
    mem.add_argument("--pss-every", type=int, default=10,
                     help="read PSS (smaps_rollup, ~10 ms per torch process) every Nth sample only")
    mem.add_argument("--timeout", type=float, default=600.0, help="seconds the resume may take")
    mem.add_argument("--series", action="store_true", help="include every sample in the JSON")
    mem.add_argument("--keep-runs", action="store_true", help="keep the run folders under WORK/runs")
    ld = sub.add_parser("loader", parents=[common], help="state_dict() cost and first-batch times of this checkout's "
                        "loader after a resume", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ld.add_argument("--repeats", type=int, default=5)
    ld.add_argument("--calls", type=int, default=10000, help="state_dict() calls per figure")
    ld.add_argument("--settle", type=float, default=1.0,
                    help="seconds to wait before timing state_dict() calls, while the decode workers fill their slots")
    ld.set_defaults(repo=str(HERE))  # the settings record the checkout measured, as memory's --repo does
    args = parser.parse_args(argv)
    try:
        result = memory_mode(args) if args.mode == "memory" else loader_mode(args)
    except resume.BenchError as e:
        print(f"bench_resume.py: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(table(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
