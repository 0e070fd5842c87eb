"""What a resume in the middle of an epoch costs: in memory (a whole train.py run, `resume_once`) and in time (the
loader alone, `loader_figures`). tools/bench_resume.py is the command line; its flags are named below.

memory (`resume_once`): an elastic resume, for real. A first train.py run on 2 CPU ranks (torchrun, gloo; the host
backend) stops inside epoch 0 with a checkpoint (--stop-step, as --max-steps); then the same run folder is resumed on
1 rank (--resume auto), which trains the rest of that epoch on the new layout (and, with --epochs 2, the next epoch
whole). While it runs, a pipeline.bench.memory.Sampler reads the resumed process's tree every --interval-ms (rss,
pss, pss_anon, shm, workers, by role: that module says what each holds). Reported per repetition:
  rest_*_peak / _mean  over the rest of the resumed epoch: from the first sample with a decode worker alive to the
                       first log line of the next epoch (the run logs every step, -p 1). This is the phase in which
                       a second train loader for the rest of the epoch exists, where a checkout builds one;
  workers_at_peak      decode processes alive at the sample of the rest's rss peak; workers_max: the most at any
                       sample; shm_files_max: the most vitpipe slots at any sample;
  rss_peak, pss_peak   over the whole resumed run (start-up and exit included);
  forks_seen           samples' children caught between fork and exec (left out of the sums);
  sampler_cpu_s        the sampler's own CPU time: on a 2-core machine it slows the run a little, the same for every
                       checkout measured. Samples are --interval-ms apart, so a shorter peak can be missed.

loader (`loader_figures`): the loader's resume API (`state_dict()` / `load_state_dict()`) without a trainer, in this
process, on the train split (the host backend, --workers, --batch-size, --img-size, device cpu, seed 0):
  state_dict_us          a loader read to the middle of epoch 0 (decode workers started, their slots full after
                         --settle s): the mean time of one `state_dict()` call over --calls calls, in microseconds;
  fresh_first_batch_s    build_loader + set_epoch(0) + iter + next: a fresh loader's first batch;
  resumed_first_batch_s  build_loader + load_state_dict(state) + iter + next, the state taken in the middle of
                         epoch 0 on world_size 1;
  elastic_first_batch_s  the same with a state taken in the middle of epoch 0 on world_size 2, rank 0;
  *_after_build_s        the part of those after build_loader returned: from set_epoch / load_state_dict to the
                         first batch in hand;
  *_load_state_dict_us   the load_state_dict call alone, inside the above;
  *_state_dict_us        state_dict()'s cost on that loader after its first batch (after an elastic resume: a
                         position that carries the earlier layouts);
  *_batches_left         batches that loader had left in the epoch at its first batch.
`resumed_first_batch_matches`: the resumed first batch has the labels of the batch the first loader handed out after
its state. The three kinds run in a rotating order across repetitions. Every timed loader starts its decode
processes from the forkserver that the process's first loader started (a train.py run pays that start once), so
these clocks hold the workers' fork, first shard reads and decodes, not an interpreter's start.

Both report each repetition and, per figure, median [min, max] over --repeats (`spread`).
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.bench.memory import Sampler

# The figures each summary holds (median [min, max] over the repetitions), as (the row's name in the table that
# tools/bench_resume.py prints, or None: in the JSON only; the key). The keys are MEMORY_KEYS and LOADER_KEYS.
MEMORY_FIGURES = (
    ("rest of epoch: rss peak", "rest_rss_peak"), ("rest of epoch: pss peak", "rest_pss_peak"),
    ("rest of epoch: shm peak (allocated)", "rest_shm_peak"),
    ("rest of epoch: shm peak (created)", "rest_shm_apparent_peak"),
    ("rest of epoch: rss mean", "rest_rss_mean"), ("rest of epoch: pss mean", "rest_pss_mean"),
    ("rest of epoch: pss anon+shmem peak", "rest_pss_anon_peak"),
    ("rest of epoch: pss anon+shmem mean", "rest_pss_anon_mean"),
    ("rest of epoch: shm mean", "rest_shm_mean"), ("  main process rss mean", "rest_main_rss_mean"),
    ("  main process pss anon+shm mean", "rest_main_pss_anon_mean"),
    ("  decode workers rss mean", "rest_worker_rss_mean"),
    ("  decode workers pss mean", "rest_worker_pss_mean"),
    ("  decode workers pss anon+shm mean", "rest_worker_pss_anon_mean"),
    ("  forkserver+tracker rss mean", "rest_helper_rss_mean"),
    ("  forkserver+tracker pss anon+shm", "rest_helper_pss_anon_mean"),
    ("workers at the rest's rss peak", "workers_at_peak"), ("workers max", "workers_max"),
    ("vitpipe files max", "shm_files_max"), ("whole resume: rss peak", "rss_peak"),
    ("whole resume: pss peak", "pss_peak"), ("rest of epoch (s)", "rest_s"),
    ("resume wall (s)", "resume_s"), ("sampler cpu (s)", "sampler_cpu_s"),
    (None, "shm_peak"), (None, "shm_apparent_peak"), (None, "rest_worker_rss_peak"), (None, "rest_worker_pss_peak"),
    (None, "rest_worker_pss_anon_peak"), (None, "forks_seen"), (None, "first_run_s"))
LOADER_FIGURES = (
    ("state_dict() mid-epoch (us/call)", "state_dict_us"),
    ("  after a resume (us/call)", "resumed_state_dict_us"),
    ("  after an elastic resume (us/call)", "elastic_state_dict_us"),
    ("fresh first batch (s)", "fresh_first_batch_s"), ("resumed first batch (s)", "resumed_first_batch_s"),
    ("elastic first batch (s)", "elastic_first_batch_s"),
    ("  fresh: set_epoch -> batch (s)", "fresh_after_build_s"),
    ("  resumed: load -> batch (s)", "resumed_after_build_s"),
    ("  elastic: load -> batch (s)", "elastic_after_build_s"),
    ("load_state_dict (us)", "resumed_load_state_dict_us"),
    ("load_state_dict, elastic (us)", "elastic_load_state_dict_us"),
    (None, "fresh_state_dict_us"))
MEMORY_KEYS = tuple(key for _, key in MEMORY_FIGURES)
LOADER_KEYS = tuple(key for _, key in LOADER_FIGURES)

class BenchError(RuntimeError):
    """A step of the benchmark failed: the message says which and ends with what it printed."""


def run_checked(cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(runs: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: spread([r.get(k) for r in runs]) for k in keys}


# -- memory --------------------------------------------------------------------------------------------------------
def train_flags(args, shards: Path, out: Path) -> list[str]:
    return ["--data_path", str(shards), "--backend", "host", "--workers", str(args.workers), "--device", "cpu",
            "--model", args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--eval-freq", "0", "-p", "1", "--no-plots", "--output", str(out)]


def resume_once(args, repo: Path, shards: Path, rep: int) -> dict:
    """One repetition of the memory figures for `repo`'s train.py; `args`: the command's memory flags."""
    out = Path(args.work).resolve() / "runs" / f"{args.label or repo.name}-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    flags = train_flags(args, shards, out)
    first = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(repo / "train.py"), *flags, "--max-steps", str(args.stop_step)]
    t0 = time.perf_counter()
    run_checked(first, env, cwd=repo)
    first_s = time.perf_counter() - t0

    lines: list[tuple[float, str]] = []
    err: list[str] = []
    t0 = time.perf_counter()
    # A session of its own, so that a kill reaches its decode workers and helpers too (the process group).
    proc = subprocess.Popen([sys.executable, str(repo / "train.py"), *flags, "--resume", "auto"], env=env, cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = Sampler(proc.pid, args.interval_ms / 1000, args.pss_every)
    sampler.start()

    def read_stdout() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic() - sampler.start_time, line.rstrip("\n")))

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the resume ran past --timeout {args.timeout} s") from None
    finally:  # the timeout, Ctrl-C or any other error here: no train.py or decode worker left running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sampler.done.set()
        sampler.join()
        for reader in readers:  # what train.py wrote before it exited is in the pipes; a worker may hold them open
            reader.join(timeout=5)
    resume_s = time.perf_counter() - t0
    text = "\n".join(line for _, line in lines)
    if proc.returncode != 0:
        raise BenchError(f"the resume exited with {proc.returncode}:\n{''.join(err)[-3000:]}")
    note = next((line for _, line in lines if "goes on with" in line), None)
    if note is None:
        raise BenchError("the resume did not say it goes on with the rest of the epoch (not an elastic resume?):\n"
                         f"{text[-3000:]}")

    samples = sampler.samples
    if not samples:
        raise BenchError("no samples taken")
    next_epoch = next((t for t, line in lines if line.startswith("Epoch [1][")), None)
    start = next((s["t"] for s in samples if s["workers"]), None)
    rest = [s for s in samples if start is not None and s["t"] >= start and (next_epoch is None or s["t"] < next_epoch)]
    if not rest:
        raise BenchError("no sample with a decode worker alive before the next epoch")
    peak, rest_peak = max(samples, key=lambda s: s["rss"]), max(rest, key=lambda s: s["rss"])
    result = {
        "rep": rep, "first_run_s": round(first_s, 2), "resume_s": round(resume_s, 2), "samples": len(samples),
        "pss_samples": sum(s["pss"] is not None for s in samples), "rest_samples": len(rest),
        "rest_s": round(rest[-1]["t"] - rest[0]["t"], 2), "sampler_cpu_s": round(sampler.cpu_s, 3),
        "resume_note": note.strip(),
        # the whole resumed run (start-up and exit included)
        "rss_peak": peak["rss"], "rss_peak_t": peak["t"], "rss_peak_workers": peak["workers"],
        "pss_peak": max_of(samples, "pss"), "shm_peak": max_of(samples, "shm"),
        "shm_apparent_peak": max_of(samples, "shm_apparent"), "shm_files_max": max_of(samples, "shm_files"),
        "workers_max": max_of(samples, "workers"), "forks_seen": sum(s["forks"] for s in samples),
        # the rest of the resumed epoch
        "rest_rss_peak": rest_peak["rss"], "rest_rss_peak_t": rest_peak["t"], "workers_at_peak": rest_peak["workers"],
        "procs_at_peak": rest_peak["procs"], "rest_pss_peak": max_of(rest, "pss"), "rest_shm_peak": max_of(rest, "shm"),
        "rest_shm_apparent_peak": max_of(rest, "shm_apparent"),
    }
    for key in ("rss", "pss", "pss_anon", "shm", "main_rss", "worker_rss", "helper_rss", "worker_pss",
                "main_pss_anon", "worker_pss_anon", "helper_pss_anon"):
        result[f"rest_{key}_mean"] = mean_of(rest, key)
    for key in ("pss_anon", "worker_rss", "worker_pss", "worker_pss_anon"):
        result[f"rest_{key}_peak"] = max_of(rest, key)
    result["foreign_vitpipe_files"] = sorted(sampler.foreign)[:10]
    if args.series:
        result["series"] = samples
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return result


def max_of(samples: list[dict], key: str):
    values = [s[key] for s in samples if s[key] is not None]
    return max(values) if values else None


def mean_of(samples: list[dict], key: str):
    values = [s[key] for s in samples if s[key] is not None]
    return round(statistics.fmean(values), 1) if values else None


# -- loader --------------------------------------------------------------------------------------------------------
def loader_figures(shards: Path, *, batch_size: int, workers: int, img_size: int, repeats: int, calls: int,
                   settle: float) -> dict:
    """The loader figures on `shards`: each repetition (`runs`), their `summary`, and what the state holds."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read at torch's first import, which follows
    import torch

    from pipeline.backends import build_loader

    torch.set_num_threads(1)

    def make(rank: int = 0, world: int = 1):
        return build_loader(data_path=str(shards), split="train", backend="host", batch_size=batch_size,
                            device="cpu", rank=rank, world_size=world, seed=0, workers=workers, img_size=img_size)

    def mid_state(rank: int, world: int, timings: int = 0) -> tuple[dict, object, int, int, list[float]]:
        """(state after half of epoch 0's batches, labels of the batch after it, batches taken, epoch length, and
        `timings` figures of `time_state_dict` on that loader where it stands, its decode workers running)."""
        loader = make(rank, world)
        try:
            loader.set_epoch(0)
            total = len(loader)
            taken = total // 2
            it = iter(loader)
            for _ in range(taken):
                next(it)
            state_us = [time_state_dict(loader) for _ in range(timings)]
            state = loader.state_dict()
            _, after = next(it)
            return state, after.clone(), taken, total, state_us
        finally:
            loader.close()

    def time_state_dict(loader) -> float:
        """Mean microseconds of one state_dict() call over `calls` calls, after `settle` s in which the decode
        workers fill their slots (on a small machine they would otherwise share the cores with the calls)."""
        time.sleep(settle)
        call = loader.state_dict
        call()  # the first call may cache something; the figure is the steady one
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - t0) / calls * 1e6

    def first_batch(state: dict | None) -> dict:
        t0 = time.perf_counter()
        loader = make()
        load_s = None
        try:
            t1 = time.perf_counter()
            if state is None:
                loader.set_epoch(0)
            else:
                loader.load_state_dict(state)
                load_s = time.perf_counter() - t1
            _, labels = next(iter(loader))
            t2 = time.perf_counter()
            after = loader.state_dict()
            return {"s": t2 - t0, "from_load_s": t2 - t1, "labels": labels.clone(),
                    "left": len(loader) - after["batch"] + 1,
                    "load_us": None if load_s is None else load_s * 1e6, "state_dict_us": time_state_dict(loader)}
        finally:
            loader.close()

    resumed_state, resumed_next, resumed_taken, epoch_len, state_us = mid_state(0, 1, timings=repeats)
    elastic_state, _, elastic_taken, elastic_total, _ = mid_state(0, 2)
    kinds = {"fresh": None, "resumed": resumed_state, "elastic": elastic_state}
    order = list(kinds)
    reps, mismatches = [], []
    for rep in range(repeats):
        row = {"rep": rep, "state_dict_us": round(state_us[rep], 3)}
        for kind in order[rep % 3:] + order[:rep % 3]:
            got = first_batch(kinds[kind])
            row[f"{kind}_first_batch_s"] = round(got["s"], 4)
            row[f"{kind}_after_build_s"] = round(got["from_load_s"], 4)
            row[f"{kind}_batches_left"] = got["left"]
            row[f"{kind}_state_dict_us"] = round(got["state_dict_us"], 3)
            if got["load_us"] is not None:
                row[f"{kind}_load_state_dict_us"] = round(got["load_us"], 1)
            if kind == "resumed" and not torch.equal(got["labels"], resumed_next):
                mismatches.append(rep)
        reps.append(row)
    return {"epoch_batches": epoch_len, "state_dict_calls": calls,
            "state_dict_pickled_bytes": len(pickle.dumps(resumed_state)), "state_dict_sample": resumed_state,
            "resumed_from_batch": resumed_taken,
            "elastic_from": {"world_size": 2, "rank": 0, "batches": elastic_taken, "of": elastic_total},
            "resumed_first_batch_matches": not mismatches, "mismatched_reps": mismatches,
            "runs": reps, "summary": summary(reps, LOADER_KEYS)}
