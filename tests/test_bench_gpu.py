"""tools/bench_gpu.sh --dry-run: the plan of the two GPU calls (stages, order, estimated seconds) fits a GPU
machine's 10-minute command limit, each call and both together, and making the plan runs nothing."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CALL_LIMIT_S = 600  # what one command may run on the GPU machine
BOTH_CALLS_S = 13 * 60  # the two calls together, with the machine's start-up inside a 15-minute lease
KILL_GRACE_S = 20 + 5  # bench_gpu.sh's SIGINT-to-SIGKILL wait for the last stage, and its closing lines
KNOBS = ("BUDGET_S", "BATCH", "SIDES", "TRAIN_PER_CLASS", "DEVICE", "MIN_RES", "MAX_RES", "MAX_SIDE", "DATA_DIR")


def script_env(tmp_path: Path, **env: str) -> dict:
    """This environment without the script's knobs (their defaults are the plan under test), DATA_DIR in tmp_path."""
    return {**{k: v for k, v in os.environ.items() if k not in KNOBS}, "DATA_DIR": str(tmp_path / "data"), **env}


def dry_run(tmp_path: Path, **env: str) -> tuple[list[dict], str]:
    """The plan's stage rows, and its closing line. Runs from an empty folder with DATA_DIR inside it."""
    proc = subprocess.run(["bash", str(ROOT / "tools" / "bench_gpu.sh"), "--dry-run"], cwd=tmp_path,
                          env=script_env(tmp_path, **env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = []
    for line in lines:
        if line.startswith("#"):
            continue
        call, stage, est, at, plan, *command = line.split()
        rows.append({"call": call, "stage": stage, "est": int(est), "at": None if at == "-" else int(at),
                     "plan": plan, "command": " ".join(command)})
    return rows, lines[-1]


@pytest.fixture
def plan(tmp_path):
    return dry_run(tmp_path)


def test_the_prepare_call_builds_first_then_makes_the_data(plan):
    rows, _ = plan
    prepare = [r["stage"] for r in rows if r["call"] == "prepare"]
    assert prepare[:2] == ["build", "data"]  # make_shards adds restart markers only where the decoder is built
    assert all(r["plan"] == "run" for r in rows if r["call"] == "prepare")
    assert [r["call"] for r in rows] == ["prepare"] * len(prepare) + ["figures"] * (len(rows) - len(prepare))


def test_the_figures_call_runs_the_most_owed_first(plan):
    rows, _ = plan
    figures = [r["stage"] for r in rows if r["call"] == "figures"]
    assert figures[0] == "tests"
    owed = ["feed_dali", "feed_hybrid", "feed_side_change", "step_bs256", "step_bs256_eager", "train_minres"]
    assert figures[1:1 + len(owed)] == owed
    assert figures.index("profile") < figures.index("alone_host") < figures.index("side_160") < \
        figures.index("project") < figures.index("perf")
    planned = {r["stage"] for r in rows if r["plan"] == "run"}
    assert set(owed) | {"tests"} <= planned


def test_each_call_and_both_fit_the_gpu_machines_limits(plan):
    rows, last = plan
    prepare = sum(r["est"] for r in rows if r["call"] == "prepare")
    figures = [r for r in rows if r["call"] == "figures" and r["plan"] == "run"]
    spent = sum(r["est"] for r in figures)
    budget = 550
    assert spent <= budget and budget + KILL_GRACE_S <= CALL_LIMIT_S
    assert prepare <= CALL_LIMIT_S and prepare + spent <= BOTH_CALLS_S
    # the planned stages start where the earlier ones end, and the closing line adds up the same
    assert [r["at"] for r in figures] == [sum(r["est"] for r in figures[:k]) for k in range(len(figures))]
    assert f"prepare {prepare} s; figures {spent} s of BUDGET_S={budget}" in last


def test_a_stage_that_cannot_finish_is_skipped_and_a_shorter_one_still_runs(tmp_path):
    rows, _ = dry_run(tmp_path, BUDGET_S="200")
    figures = [r for r in rows if r["call"] == "figures"]
    assert sum(r["est"] for r in figures if r["plan"] == "run") <= 200
    skipped = next(i for i, r in enumerate(figures) if r["plan"] == "skip")
    assert any(r["plan"] == "run" for r in figures[skipped:])  # a later, shorter stage fills the rest


def test_the_dry_run_makes_nothing(tmp_path):
    rows, _ = dry_run(tmp_path)
    assert rows
    assert list(tmp_path.iterdir()) == []  # no results folder, no DATA_DIR


def test_a_figures_call_without_the_data_stops_at_once(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "tools" / "bench_gpu.sh"), str(tmp_path / "out")], cwd=tmp_path,
                          env=script_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--prepare" in proc.stderr
    assert list(tmp_path.iterdir()) == []
