"""trainlib/distributed.py's lost peers, for real: 2 CPU ranks (gloo) under torchrun and under the seed's
--multiprocessing-distributed, rank 1 stopped (SIGSTOP) or killed (SIGKILL) mid-run. The live rank must say so in one
line of ours, with no traceback, and end within --dist-timeout plus a few seconds; the job must fail."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainlib.distributed import SPAWN_GRACE_S

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 5  # --dist-timeout
SLACK_S = 4  # for the live rank's line and exit after its timeout or the kill (measured: under 0.5 s, loaded 2 cores)
RUN = ["--model", "test_vit", "--img-size", "32", "--device", "cpu", "--workers", "1", "--backend", "synthetic",
       "--num-classes", "10", "--eval-freq", "0", "-p", "1", "--max-steps", "100000", "--no-plots",
       "--dist-timeout", str(TIMEOUT_S)]


@dataclass
class Fault:
    returncode: int
    rank0_end_s: float  # when rank 0 ended, in seconds after the fault
    job_end_s: float  # when the launcher ended, likewise
    rank0_err: str  # rank 0's stderr (under the spawner: the job's, which all its processes share)


def free_port() -> int:
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
        time.sleep(0.1)
    raise AssertionError("the launcher's two ranks not found")


def ended(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) in ("Z", "X")
    except OSError:
        return True


def fault_mid_run(tmp_path: Path, launcher: str, sig: signal.Signals, job_limit_s: float) -> Fault:
    """Two ranks under `launcher` (torchrun or spawn); `sig` to rank 1 once rank 0 has logged its third step. Waits
    up to `job_limit_s` after the fault for the job to end. A stopped rank 1 still there once rank 0 has ended is
    killed under torchrun (which would wait its 30 s grace for it: docs/training.md); the spawner must end it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    out, err, logs = tmp_path / "stdout.log", tmp_path / "stderr.log", tmp_path / "logs"
    tmp_path.mkdir()
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir",
               str(logs), "--redirects", "3", str(ROOT / "train.py"), *RUN, "--batch-size", "4"]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), *RUN, "--multiprocessing-distributed", "--nproc-per-node", "2",
               "--batch-size", "8", "--dist-url", f"tcp://127.0.0.1:{free_port()}"]
    with out.open("w") as stdout, err.open("w") as stderr:
        job = subprocess.Popen([*cmd, "--output", str(tmp_path / "run")], env=env, cwd=ROOT, stdout=stdout,
                               stderr=stderr)
    ranks = []
    try:
        ranks = rank_pids(job, spawned=launcher == "spawn")
        rank0_out = out if launcher == "spawn" else None
        deadline = time.monotonic() + 180
        while rank0_out is None or "Epoch [0][3/" not in rank0_out.read_text(errors="replace"):
            assert job.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            rank0_out = rank0_out or next(logs.glob("*/attempt_0/0/stdout.log"), None)
            time.sleep(0.05)
        os.kill(ranks[1], sig)
        fault = time.monotonic()
        rank0_end = job_end = None
        while job_end is None and time.monotonic() < fault + job_limit_s:
            if rank0_end is None and ended(ranks[0]):
                rank0_end = time.monotonic() - fault
                if launcher == "torchrun" and sig == signal.SIGSTOP:
                    os.kill(ranks[1], signal.SIGKILL)
            if job.poll() is not None:
                job_end = time.monotonic() - fault
            time.sleep(0.05)
        assert rank0_end is not None and job_end is not None, f"still running {job_limit_s} s after the fault"
        rank0_err = err if launcher == "spawn" else next(logs.glob("*/attempt_0/0/stderr.log"))
        return Fault(job.returncode, rank0_end, job_end, rank0_err.read_text())
    finally:
        for pid in ranks if job.poll() is None else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.kill()
        job.wait()


def test_a_stopped_peer_is_one_line_from_the_live_rank_which_ends_after_the_timeout(tmp_path):
    """Rank 1 SIGSTOPped: rank 0 gives up after --dist-timeout, says so in one line and ends. The spawner then ends
    the stopped rank within 2 x SPAWN_GRACE_S (torch's own waits 30 s after a SIGTERM a stopped process cannot take,
    and then printed the rank's pickled traceback)."""
    for launcher in ("torchrun", "spawn"):
        fault = fault_mid_run(tmp_path / launcher, launcher, signal.SIGSTOP, TIMEOUT_S + 2 * SPAWN_GRACE_S + 30)
        ours = [line for line in fault.rank0_err.splitlines() if line.startswith("train.py:")]
        assert len(ours) == 1 and "Traceback" not in fault.rank0_err, (launcher, fault)
        assert ours[0].startswith("train.py: error: rank 0: ") and (
            f"timed out after --dist-timeout {TIMEOUT_S} s: rank 1 did not answer") in ours[0], (launcher, fault)
        assert TIMEOUT_S - 0.5 < fault.rank0_end_s < TIMEOUT_S + SLACK_S, (launcher, fault)
        assert fault.returncode != 0, (launcher, fault)
        if launcher == "spawn":
            assert fault.job_end_s < fault.rank0_end_s + 2 * SPAWN_GRACE_S + SLACK_S, fault


def test_a_killed_peer_is_one_line_from_the_live_rank_which_ends_at_once(tmp_path):
    """Rank 1 SIGKILLed: rank 0's collective fails at once (gloo: "Connection reset by peer"); one line of ours, not
    gloo's traceback, and the job ends within seconds. The spawner adds one line naming the killed rank."""
    for launcher in ("torchrun", "spawn"):
        fault = fault_mid_run(tmp_path / launcher, launcher, signal.SIGKILL, 60)
        ours = [line for line in fault.rank0_err.splitlines() if line.startswith("train.py:")]
        assert "Traceback" not in fault.rank0_err, (launcher, fault)
        assert ours[0].startswith("train.py: error: rank 0: ") and "rank 1 went away" in ours[0], (launcher, fault)
        if launcher == "spawn":
            assert len(ours) == 2 and "rank 1 (pid " in ours[1] and "was ended by SIGKILL" in ours[1], fault
        else:
            assert len(ours) == 1, fault
        assert fault.rank0_end_s < SLACK_S and fault.job_end_s < SLACK_S + 1, (launcher, fault)
        assert fault.returncode != 0, (launcher, fault)
