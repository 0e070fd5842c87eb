"""Time a lost peer: rank 1 of a 2-rank CPU job stopped (SIGSTOP) or killed (SIGKILL) mid-run, under torchrun and
under train.py's --multiprocessing-distributed, and what rank 0 and the launcher print.

    python tools/time_faults.py [--dist-timeout 5] [--repeats 2] [--cases stopped/torchrun ...] [--repo PATH]

Each run is trainlib/bench/faults.py's `fault_mid_run` (its docstring says what each figure measures): train.py on 2
ranks (gloo, synthetic data, test_vit at 32 px), the signal sent once rank 0 has logged its third step, the job left
to end by itself (a stopped rank is not killed for it: under torchrun the job's end includes torchrun's 30 s grace).
`--repo` (default: this checkout) picks the train.py and the packages the job runs (its PYTHONPATH and working
folder), so one copy of this script measures two checkouts with the same flags; the other checkout needs its
compiled modules (pipeline/*.so, pipeline/shards/*.so) in place.

Output: one JSON object per run on stdout (times in seconds after the signal); then, on stderr, a table with each
case's figures over the repeats (one value, or min-max).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from pipeline.cli import CommandParser, finite_float
from trainlib.bench import faults

CASES = [f"{fault}/{launcher}" for fault in faults.FAULTS for launcher in faults.LAUNCHERS]
GRACE_S = 60  # after --dist-timeout, for the job to end (torchrun takes 30 s more for a stopped rank)


def commit(repo: Path) -> str:
    """`repo`'s short commit, "+dirty" where tracked files differ from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rounded(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def run_once(case: str, repeat: int, args, work: Path, settings: dict) -> dict:
    """One run of `case` ("stopped/torchrun", ...), as the JSON object printed for it."""
    fault_name, launcher = case.split("/")
    load = os.getloadavg()[0]  # the machine's 1-minute load average as the run starts
    fault = faults.fault_mid_run(work / f"{fault_name}-{launcher}-{repeat}", launcher, faults.FAULTS[fault_name],
                                 args.dist_timeout + GRACE_S, dist_timeout=args.dist_timeout, repo=args.repo)
    return {"case": case, "repeat": repeat, **settings, "load_1min": round(load, 2),
            "line_s": rounded(fault.line_s), "rank0_end_s": rounded(fault.rank0_end_s),
            "job_end_s": rounded(fault.job_end_s), "returncode": fault.returncode, "rank0_exit": fault.rank0_exit,
            "rank0_err_lines": len(fault.rank0_err.splitlines()),
            "launcher_err_lines": len(fault.launcher_err.splitlines()),
            "rank0_traceback": "Traceback" in fault.rank0_err,
            "rank0_train_py_lines": [line for line in fault.rank0_err.splitlines() if line.startswith("train.py:")]}


def seconds(values: list) -> str:
    def one(x: float) -> str:
        return f"{x:.2f}" if x < 1 else f"{x:.1f}"

    values = [v for v in values if v is not None]
    if not values:
        return "none"
    low, high = one(min(values)), one(max(values))
    return low if low == high else f"{low}-{high}"


def counts(values: list) -> str:
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def table(runs: list[dict], settings: dict, repeats: int) -> str:
    out = [f"time_faults.py: {settings['repo']} at {settings['commit']}, torch {settings['torch']}, "
           f"{settings['cpus']} CPUs, --dist-timeout {settings['dist_timeout']:g}; seconds after the signal, "
           f"over {repeats} run(s) each",
           "| fault, launcher | line at | rank 0 gone | job end | exit: job (rank 0) | rank-0 stderr lines | "
           "launcher stderr lines |", "|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in runs):
        rs = [r for r in runs if r["case"] == case]
        exits = sorted({r["returncode"] for r in rs})
        rank0 = sorted({r["rank0_exit"] for r in rs if r["rank0_exit"] is not None})
        exit_text = ", ".join(map(str, exits)) + (f" ({', '.join(map(str, rank0))})" if rank0 else "")
        out.append(f"| {case.replace('/', ', ')} | {seconds([r['line_s'] for r in rs])} | "
                   f"{seconds([r['rank0_end_s'] for r in rs])} | {seconds([r['job_end_s'] for r in rs])} | "
                   f"{exit_text} | {counts([r['rank0_err_lines'] for r in rs])} | "
                   f"{counts([r['launcher_err_lines'] for r in rs])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dist-timeout", type=finite_float, default=5.0,
                   help="train.py's --dist-timeout, seconds (default 5)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each case (default 1)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=CASES, metavar="FAULT/LAUNCHER",
                   help=f"which of {', '.join(CASES)} (default: all, in that order)")
    p.add_argument("--repo", type=Path, default=faults.ROOT,
                   help="the checkout whose train.py runs (default: this one)")
    p.add_argument("--work", type=Path, default=None,
                   help="keep each run's folder (its logs) in a new folder under this one (default: a temporary "
                   "folder, removed)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.dist_timeout <= 0:
        p.error("--repeats must be >= 1 and --dist-timeout > 0")
    args.repo = args.repo.resolve()
    if not (args.repo / "train.py").is_file():
        p.error(f"--repo {args.repo}: no train.py there")
    settings = {"repo": str(args.repo), "commit": commit(args.repo), "torch": metadata.version("torch"),
                "cpus": os.cpu_count(), "dist_timeout": args.dist_timeout,
                "date": time.strftime("%Y-%m-%d")}
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="time_faults-", dir=args.work))
    runs = []
    try:
        for repeat in range(args.repeats):
            for case in args.cases:
                try:
                    runs.append(run_once(case, repeat, args, work, settings))
                except AssertionError as e:
                    print(f"time_faults.py: {case}, run {repeat}: {str(e)[-2000:]}", file=sys.stderr)
                    return 1
                print(json.dumps(runs[-1]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(runs, settings, args.repeats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
