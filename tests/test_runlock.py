"""One run per run folder (trainlib/runlock.py) and the resume marker of metrics.jsonl (trainlib/runlog.py
`read_metrics`), with real train.py processes: two runs on one --output at once, a lock left by kill -9, a resume after
kill -9 whose redone steps each read once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import compare_runs

ROOT = Path(__file__).resolve().parent.parent
# One random batch resident on the CPU (no decode workers), ImageNet's epoch length: runs as long as a test needs.
TRAIN = [sys.executable, "-u", str(ROOT / "train.py"), "--model", "test_vit", "--img-size", "32", "--device", "cpu",
         "--workers", "1", "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0",
         "--no-plots", "-p", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def start(out: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([*TRAIN, "--output", str(out), *flags], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TRAIN, "--output", str(out), *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def wait_for(proc: subprocess.Popen, prefix: str) -> None:
    """Read `proc`'s output until a line starts with `prefix` (a step it logged)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"ended before {prefix!r}: {proc.stderr.read()[-3000:]}")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_on_a_busy_output_exits_2_naming_the_first_which_keeps_its_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("a launch script's log\n")  # tools/train_*.sh make the folder and this first
    first = start(out, "--max-steps", "1000000")
    try:
        wait_for(first, "Epoch [0][3/")
        holder = f"pid {first.pid} on host {socket.gethostname()} (started "
        for flags in (["--max-steps", "5"], ["--evaluate", "--resume", "auto"]):  # an evaluation writes there too
            second = run(out, *flags)
            assert second.returncode == 2 and second.stdout == "", second.stderr[-3000:]
            assert second.stderr.count("\n") == 1, second.stderr
            assert second.stderr.startswith(f"train.py: error: --output {out} is in use by {holder}"), second.stderr
            assert second.stderr.endswith("); wait for it, or give another --output\n"), second.stderr
        assert (out / "train.lock").read_text().startswith(holder)  # the name in the line: what the file holds
        first.send_signal(signal.SIGTERM)  # it stops at the next step with a checkpoint (exit 143)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 143, err[-3000:]
    step = int(err.split("global step ")[1].split()[0])
    # Its files are its own: every step once, in order, its config, its checkpoint; the lock went with it.
    assert [r["global_step"] for r in records(out) if r["kind"] == "train"] == list(range(1, step + 1))
    assert json.loads((out / "config.json").read_text())["max_steps"] == 1000000
    from trainlib import checkpoint
    assert checkpoint.load(out / "last.pth")["global_step"] == step
    assert (out / "train.log").read_text() == "a launch script's log\n"
    assert not (out / "train.lock").exists()


def test_a_lock_left_by_a_kill_9_is_taken_over_with_a_line_naming_its_holder(tmp_path):
    out = tmp_path / "run"
    killed = start(out, "--max-steps", "1000000")
    try:
        wait_for(killed, "Epoch [0][2/")
    finally:
        killed.kill()  # SIGKILL: no code of its own runs, the kernel drops its flock
        killed.communicate(timeout=60)
    after = run(out, "--max-steps", "2")
    assert after.returncode == 0, after.stderr[-3000:]
    holder = f"pid {killed.pid} on host {socket.gethostname()} (started "
    notes = [line for line in after.stdout.splitlines() if line.startswith("note: took over the lock")]
    assert len(notes) == 1, after.stdout[-3000:]
    assert notes[0].startswith(f"note: took over the lock of --output {out} from {holder}"), notes
    assert notes[0].endswith("), which is no longer running (killed?)"), notes
    assert not (out / "train.lock").exists()  # the run that took it over removed it at its end


def test_a_resume_after_a_kill_9_is_marked_and_readers_see_each_step_once_with_the_resumed_values(tmp_path):
    out, flags = tmp_path / "run", ["--save-steps", "5", "--max-steps", "12"]
    killed = start(out, *flags)
    try:
        wait_for(killed, "Epoch [0][8/")  # a checkpoint at step 5 stands, steps 6.. logged past it
    finally:
        killed.kill()
        killed.communicate(timeout=60)
    from trainlib import checkpoint
    saved = checkpoint.load(out / "last.pth")["global_step"]
    before = [r["global_step"] for r in records(out) if r["kind"] == "train"]
    assert saved % 5 == 0 and before == list(range(1, max(before) + 1)) and max(before) > saved, (saved, before)

    resumed = run(out, *flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    raw = records(out)
    markers = [i for i, r in enumerate(raw) if r["kind"] == "resume"]
    assert len(markers) == 1, raw
    marker = raw[markers[0]]
    assert {k: marker[k] for k in ("from_step", "next_step", "epoch", "checkpoint")} == {
        "from_step": saved + 1, "next_step": saved + 1, "epoch": 0, "checkpoint": str(out / "last.pth")}
    logged = [r["global_step"] for r in raw if r["kind"] == "train"]
    assert len(logged) == 12 + max(before) - saved  # the redone steps are in the file twice

    from trainlib.runlog import read_metrics
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["global_step"] for r in train] == list(range(1, 13))  # each step once
    ours = {r["global_step"]: r for r in raw[markers[0]:] if r["kind"] == "train"}
    assert train[saved:] == [ours.get(step) for step in range(saved + 1, 13)]  # the resumed run's records
    assert all(r["time"] < marker["time"] for r in train[:saved])
    # The tools read it the same way: compare_runs' mean loss is over the 12 steps read, each once.
    mean = compare_runs.curve(out)[0]["loss"]
    assert abs(mean - sum(r["loss"] for r in train) / 12) < 1e-12


def test_markers_drop_what_their_checkpoint_precedes_through_chained_and_elastic_resumes(tmp_path):
    from trainlib.runlog import read_metrics

    def train(step, epoch, run):
        return {"kind": "train", "epoch": epoch, "global_step": step, "loss": float(run)}

    def resume(first, epoch, next_step=None):
        return {"kind": "resume", "from_step": first, "next_step": next_step or first, "epoch": epoch,
                "checkpoint": "last.pth"}

    rows = [train(1, 0, 1), train(2, 0, 1), train(3, 0, 1), train(4, 0, 1),  # run 1: a checkpoint at epoch 0's end
            {"kind": "skipped", "epoch": 0, "split": "train", "samples": 1}, train(5, 1, 1), train(6, 1, 1),
            resume(5, 1), train(5, 1, 2),  # run 2 resumes there and dies before its next checkpoint
            resume(5, 1), train(5, 1, 3), train(6, 1, 3), train(7, 1, 3),  # run 3 from the same checkpoint
            {"kind": "skipped", "epoch": 1, "split": "train", "samples": 2},  # epoch 1 ends; killed before its save
            resume(7, 1, next_step=4), train(4, 1, 4),  # run 4 from step 6 on a layout of half as many steps (3)
            resume(4, 1), train(4, 1, 5), train(5, 1, 5)]  # run 5 from run 4's start (its step 3)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = [(r["kind"], r.get("global_step"), r.get("loss")) for r in read_metrics(tmp_path)]
    assert kept == [("train", 1, 1.0), ("train", 2, 1.0), ("train", 3, 1.0), ("train", 4, 1.0), ("skipped", None, None),
                    ("resume", None, None), ("resume", None, None), ("train", 5, 3.0), ("train", 6, 3.0),
                    ("resume", None, None), ("resume", None, None), ("train", 4, 5.0), ("train", 5, 5.0)]


def test_a_file_system_without_flock_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch):
    """flock refused (ENOLCK, as some network file systems answer): the start fails in words, and the folders and
    lock file it made go again, as for any failed start. The refusal is stood in for: no such file system here."""
    import errno
    import fcntl

    from trainlib.config import ConfigError
    from trainlib.runlock import RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "runs" / "a"
    with pytest.raises(ConfigError, match=r"cannot lock .*train.lock \(No locks available\): put the run folder on"):
        RunLock(out)
    assert not (tmp_path / "runs").exists()
