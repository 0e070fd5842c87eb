"""trainlib/distributed.py's lost peers, for real: 2 CPU ranks (gloo) under torchrun and under the seed's
--multiprocessing-distributed, rank 1 stopped (SIGSTOP) or killed (SIGKILL) mid-run. The live rank must say so in one
line of ours, with no traceback, and end within --dist-timeout plus a few seconds; the job must fail. The launch,
the signal and the timing are trainlib/bench/faults.py's, which tools/time_faults.py runs for docs/training.md's
figures."""
from __future__ import annotations

import signal

from trainlib.bench.faults import fault_mid_run
from trainlib.distributed import SPAWN_GRACE_S

TIMEOUT_S = 5  # --dist-timeout
SLACK_S = 4  # for the live rank's line and exit after its timeout or the kill (measured: under 0.5 s, loaded 2 cores)


def test_a_stopped_peer_is_one_line_from_the_live_rank_which_ends_after_the_timeout(tmp_path):
    """Rank 1 SIGSTOPped: rank 0 gives up after --dist-timeout, says so in one line and ends. The spawner then ends
    the stopped rank within 2 x SPAWN_GRACE_S (torch's own waits 30 s after a SIGTERM a stopped process cannot take,
    and then printed the rank's pickled traceback)."""
    for launcher in ("torchrun", "spawn"):
        # A stopped rank 1 still there once rank 0 has ended is killed under torchrun, which would wait its 30 s
        # grace for it (docs/training.md); the spawner must end it itself.
        fault = fault_mid_run(tmp_path / launcher, launcher, signal.SIGSTOP, TIMEOUT_S + 2 * SPAWN_GRACE_S + 30,
                              dist_timeout=TIMEOUT_S, kill_stopped=launcher == "torchrun")
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
        fault = fault_mid_run(tmp_path / launcher, launcher, signal.SIGKILL, 60, dist_timeout=TIMEOUT_S)
        ours = [line for line in fault.rank0_err.splitlines() if line.startswith("train.py:")]
        assert "Traceback" not in fault.rank0_err, (launcher, fault)
        assert ours[0].startswith("train.py: error: rank 0: ") and "rank 1 went away" in ours[0], (launcher, fault)
        if launcher == "spawn":
            assert len(ours) == 2 and "rank 1 (pid " in ours[1] and "was ended by SIGKILL" in ours[1], fault
        else:
            assert len(ours) == 1, fault
        assert fault.rank0_end_s < SLACK_S and fault.job_end_s < SLACK_S + 1, (launcher, fault)
        assert fault.returncode != 0, (launcher, fault)
