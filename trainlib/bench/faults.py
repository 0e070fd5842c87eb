"""A lost peer, for real: what a 2-rank job prints and how long it takes to end when rank 1 is stopped (SIGSTOP:
silent, it holds its sockets open) or killed (SIGKILL: its sockets close at once) mid-run.

`fault_mid_run` launches train.py on 2 CPU ranks (gloo, the synthetic backend, `test_vit` at 32 px: `RUN_FLAGS`)
under torchrun (`--standalone --nproc_per_node=2`, each rank's output to its own files) or under train.py's own
`--multiprocessing-distributed` launcher ("spawn"), waits until rank 0 has logged its third step (`Epoch [0][3/`),
sends the signal to rank 1 and watches, every `POLL_S` seconds, until the launcher has exited.
tests/test_distributed.py asserts on what it returns; tools/time_faults.py prints it for docs/training.md ("A stopped
or dead peer").

How to read a `Fault`: every time is in seconds after the signal was sent, on the monotonic clock of the process
that watches, and late by up to `POLL_S` plus whatever a loaded machine adds to waking that process up.
  line_s       when rank 0's first `train.py: error:` line was in its stderr file (the ranks run unbuffered: when it
               was printed); None if it printed none
  rank0_end_s  when rank 0's process had ended (a zombie counts: it has run its last instruction)
  job_end_s    when the launcher had exited
  returncode   the launcher's exit status
  rank0_exit   rank 0's exit status as torchrun's failure report gives it (negative: ended by that signal); None
               under the spawner, whose status is that of the first rank that failed (`returncode`)
  rank0_err    rank 0's stderr. Under the spawner every process writes to the job's stderr, so it is the job's
  launcher_err the launcher's own stderr: torchrun's report under torchrun; the job's (= rank0_err) under the spawner
A stopped rank 1 that is still there once rank 0 has ended is killed when `kill_stopped` is set: torchrun would
otherwise wait its 30 s grace for it (docs/training.md) and the job's end would measure that wait.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout this module is in: train.py's folder
LAUNCHERS = ("torchrun", "spawn")
FAULTS = {"stopped": signal.SIGSTOP, "dead": signal.SIGKILL}
POLL_S = 0.02
# Each rank: a tiny model on 32 px synthetic images, a log line per step, no end in sight (the fault ends it).
RUN_FLAGS = ["--model", "test_vit", "--img-size", "32", "--device", "cpu", "--workers", "1", "--backend", "synthetic",
             "--num-classes", "10", "--eval-freq", "0", "-p", "1", "--max-steps", "100000", "--no-plots"]
BATCH = {"torchrun": 4, "spawn": 8}  # per rank under torchrun, per node under the spawner (4 a rank both ways)
ERROR_LINE = "train.py: error:"
START_S = 180  # for the job to reach rank 0's third step


@dataclass
class Fault:
    returncode: int
    rank0_end_s: float
    job_end_s: float
    rank0_err: str
    line_s: float | None = None
    rank0_exit: int | None = None
    launcher_err: str = ""


def launch_command(launcher: str, repo: Path, dist_timeout: float, logs: Path | None = None) -> list[str]:
    """The job's command line, train.py being `repo`'s (its --output is added by the caller); `logs`: torchrun's
    --log-dir, each rank's stdout and stderr in files of their own there (--redirects 3)."""
    flags = [*RUN_FLAGS, "--dist-timeout", f"{dist_timeout:g}", "--batch-size", str(BATCH[launcher])]
    if launcher == "torchrun":
        redirect = ["--log-dir", str(logs), "--redirects", "3"] if logs is not None else []
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *redirect,
                str(repo / "train.py"), *flags]
    if launcher == "spawn":
        return [sys.executable, str(repo / "train.py"), *flags, "--multiprocessing-distributed", "--nproc-per-node",
                "2", "--dist-url", f"tcp://127.0.0.1:{free_port()}"]
    raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")


def free_port() -> int:
    """A loopback port free now, for the spawner's rendezvous (torchrun --standalone picks its own). It is released
    before rank 0 binds it, so another process may take it meanwhile; the job then fails to start and says so. (The
    race of ports chosen one at a time being the same port, which tests/s3server.py's `free_ports` closes, does not
    arise with one port.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(parent: int) -> list[tuple[int, bytes, bytes]]:
    """(pid, command line, environment) of `parent`'s child processes, in start order."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if proc.name.isdigit() and int(stat[1]) == parent:
                found.append((int(stat[19]), int(proc.name), (proc / "cmdline").read_bytes(),
                              (proc / "environ").read_bytes()))
        except (OSError, ValueError, IndexError):
            continue
    return [(pid, cmdline, environ) for _, pid, cmdline, environ in sorted(found)]


def rank_pids(launcher: subprocess.Popen, spawned: bool) -> list[int]:
    """Ranks 0 and 1, by the launcher's own children only (another job's ranks on this machine look the same):
    torchrun's carry RANK in their environment; the spawner's are its spawn_main children, in rank order."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = children(launcher.pid)
        if spawned:
            pids = [pid for pid, cmdline, _ in kids if b"spawn_main" in cmdline]
        else:
            by_rank = {rank: pid for pid, _, environ in kids for rank in (0, 1)
                       if f"\0RANK={rank}\0".encode() in b"\0" + environ}
            pids = [by_rank[rank] for rank in (0, 1) if rank in by_rank]
        if len(pids) == 2:
            return pids
        if launcher.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"the launcher's two ranks not found (its exit status: {launcher.poll()})")


def ended(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) in ("Z", "X")
    except OSError:
        return True


def torchrun_exit(report: str, rank: int) -> int | None:
    """`rank`'s exit status from torchrun's ChildFailedError report (`rank : 0 (local_rank: 0)` beside
    `exitcode : 1 (pid: N)`); None where the report does not name it."""
    for block in re.split(r"\n\s*\[\d+\]:?\n", report):
        if re.search(rf"rank\s*:\s*{rank}\s*\(local_rank", block):
            found = re.search(r"exitcode\s*:\s*(-?\d+)", block)
            if found:
                return int(found.group(1))
    return None


class _Tail:
    """Whether a file being written holds a line starting with `prefix` yet; it is read again only once its size has
    changed."""

    def __init__(self, prefix: str):
        self.prefix, self.seen, self.text = prefix, 0, ""

    def found(self, path: Path | None) -> bool:
        if path is None:
            return False
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if size != self.seen:
            self.text = path.read_text(errors="replace")
            self.seen = size
        return any(line.startswith(self.prefix) for line in self.text.splitlines())


def fault_mid_run(folder: Path, launcher: str, sig: signal.Signals, job_limit_s: float, *, dist_timeout: float = 5,
                  kill_stopped: bool = False, repo: Path = ROOT) -> Fault:
    """Two ranks of `repo`'s train.py under `launcher` (torchrun or spawn), their files in `folder` (made here: it
    must not exist); `sig` to rank 1 once rank 0 has logged its third step. Waits up to `job_limit_s` after the fault
    for the job to end (AssertionError if it does not, or if it ends or stalls before the fault). `kill_stopped`: a
    stopped rank 1 still there once rank 0 has ended is killed (SIGKILL)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}
    out, err, logs = folder / "stdout.log", folder / "stderr.log", folder / "logs"
    folder.mkdir()
    cmd = launch_command(launcher, repo, dist_timeout, logs)
    with out.open("w") as stdout, err.open("w") as stderr:
        job = subprocess.Popen([*cmd, "--output", str(folder / "run")], env=env, cwd=repo, stdout=stdout,
                               stderr=stderr)
    ranks = []
    try:
        ranks = rank_pids(job, spawned=launcher == "spawn")
        rank0_out = out if launcher == "spawn" else None
        deadline = time.monotonic() + START_S
        while rank0_out is None or "Epoch [0][3/" not in rank0_out.read_text(errors="replace"):
            assert job.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            rank0_out = rank0_out or next(logs.glob("*/attempt_0/0/stdout.log"), None)
            time.sleep(0.05)
        rank0_err = err if launcher == "spawn" else rank0_out.parent / "stderr.log"
        line, tail = None, _Tail(ERROR_LINE)
        os.kill(ranks[1], sig)
        fault = time.monotonic()
        rank0_end = job_end = None
        while job_end is None and time.monotonic() < fault + job_limit_s:
            if line is None and tail.found(rank0_err):
                line = time.monotonic() - fault
            if rank0_end is None and ended(ranks[0]):
                rank0_end = time.monotonic() - fault
                if kill_stopped and sig == signal.SIGSTOP and not ended(ranks[1]):
                    os.kill(ranks[1], signal.SIGKILL)
            if job.poll() is not None:
                job_end = time.monotonic() - fault
            time.sleep(POLL_S)
        assert rank0_end is not None and job_end is not None, f"still running {job_limit_s} s after the fault"
        if line is None and tail.found(rank0_err):  # written within the last poll: the job's end bounds it
            line = job_end
        launcher_err = err.read_text(errors="replace")
        return Fault(job.returncode, rank0_end, job_end, rank0_err.read_text(errors="replace"), line_s=line,
                     rank0_exit=torchrun_exit(launcher_err, 0) if launcher == "torchrun" else None,
                     launcher_err=launcher_err)
    finally:
        for pid in ranks if job.poll() is None else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.kill()
        job.wait()
