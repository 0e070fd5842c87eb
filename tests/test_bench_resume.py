"""The resume benchmark (tools/bench_resume.py): the loader figures on the sample shards, and the process-tree sampler
that the memory figures come from, on a small child process."""
import argparse
import os
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.bench import memory, resume
from pipeline.plan import Stage, rest_samples, steps_per_epoch
from pipeline.shards.format import open_shard_set

BATCH = 4


@pytest.fixture(scope="module")
def figures(sample_shards):
    return resume.loader_figures(sample_shards, batch_size=BATCH, workers=1, img_size=32, repeats=2, calls=50,
                                 settle=0)


def test_loader_figures_resume_where_the_plan_says(sample_shards, figures):
    n = open_shard_set(sample_shards).manifest.splits["train"].num_samples
    total = steps_per_epoch(n, BATCH, 1, train=True)
    assert figures["epoch_batches"] == total
    assert figures["resumed_from_batch"] == total // 2
    assert figures["resumed_first_batch_matches"] and figures["mismatched_reps"] == []
    elastic = figures["elastic_from"]
    assert elastic["of"] == steps_per_epoch(n, BATCH, 2, train=True) and elastic["batches"] == elastic["of"] // 2
    # rule 6: the rest of the epoch is what neither rank of the 2-rank layout read, split anew on 1 rank
    elastic_left = steps_per_epoch(rest_samples(n, (Stage(2, BATCH, elastic["batches"]),)), BATCH, 1, train=True)
    assert len(figures["runs"]) == 2
    for row in figures["runs"]:
        assert row["fresh_batches_left"] == total
        assert row["resumed_batches_left"] == total - figures["resumed_from_batch"]
        assert row["elastic_batches_left"] == elastic_left
        assert row["state_dict_us"] > 0
        for kind in ("fresh", "resumed", "elastic"):
            assert row[f"{kind}_state_dict_us"] > 0
            assert row[f"{kind}_first_batch_s"] >= row[f"{kind}_after_build_s"] > 0
        assert row["resumed_load_state_dict_us"] > 0 and row["elastic_load_state_dict_us"] > 0
        assert "fresh_load_state_dict_us" not in row


def test_loader_figures_summary_and_state(figures):
    assert set(figures["summary"]) == set(resume.LOADER_KEYS)
    for key in resume.LOADER_KEYS:
        got = figures["summary"][key]
        assert got is not None and got["min"] <= got["median"] <= got["max"], key
    state = figures["state_dict_sample"]
    assert state["batch"] == figures["resumed_from_batch"] and state["world_size"] == 1
    assert figures["state_dict_pickled_bytes"] > 0


CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    ballast = bytearray(64 * 2**20)  # resident: every page written
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    # a batch slot of this process, named as the host backend names them
    with open(f"/dev/shm/vitpipe_{os.getpid()}_{sys.argv[1]}_0_0", "wb") as f:
        f.write(b"x" * 8192)
    sub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a "decode worker"
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes it
    sub.kill()
    sub.wait()
""")


@pytest.mark.skipif(not os.path.isdir("/proc") or not os.path.isdir("/dev/shm"), reason="reads Linux /proc")
def test_sampler_follows_a_process_tree():
    token = os.urandom(4).hex()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, token], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    name = f"vitpipe_{proc.pid}_{token}_0_0"
    foreign = f"vitpipe_{os.getpid()}_{token}_1_0"  # this test's pid: not in the sampled tree
    sampler = memory.Sampler(proc.pid, 0.05, pss_every=1)
    try:
        assert proc.stdout.readline() == "ready\n"
        open(f"/dev/shm/{foreign}", "wb").close()
        sampler.start()
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sampler.done.set()
        sampler.join()
        proc.stdin.close()
        proc.wait(timeout=30)
        for leftover in (name, foreign):
            try:
                os.unlink(f"/dev/shm/{leftover}")
            except FileNotFoundError:
                pass
    samples = sampler.samples
    assert len(samples) >= 4 and proc.pid in sampler.seen
    last = samples[-1]
    assert last["main_rss"] >= 64 * 2**20 and last["rss"] >= last["main_rss"]
    assert last["workers"] == 1 and last["procs"] == 2 and last["worker_rss"] > 0
    assert last["pss"] is not None and last["pss"] > 0 and last["pss_anon"] > 0
    assert last["shm_files"] == 1 and last["shm_apparent"] == 8192 and last["shm"] > 0
    assert foreign in sampler.foreign and name not in sampler.foreign
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples) and sampler.cpu_s > 0


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


HANGING_TRAIN = textwrap.dedent("""
    import subprocess, sys, time
    # a child that holds stdout open, as a decode worker would
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open("pids", "w") as f:
        f.write(f"{child.pid}\\n")
    print("Epoch [0][1/8]", flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads Linux /proc")
def test_resume_timeout_kills_the_process_group(tmp_path, monkeypatch):
    """--timeout stops a resume that hangs with its stdout open, and takes its whole process group down."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text(HANGING_TRAIN)
    monkeypatch.setattr(resume, "run_checked", lambda *a, **k: None)  # no first run
    args = argparse.Namespace(work=str(tmp_path / "work"), label=None, workers=1, model="m", img_size=32,
                              batch_size=4, epochs=1, stop_step=2, interval_ms=50.0, pss_every=10, timeout=2.0,
                              series=False, keep_runs=False)
    t0 = time.monotonic()
    with pytest.raises(resume.BenchError, match="--timeout"):
        resume.resume_once(args, repo, tmp_path / "shards", 0)
    assert time.monotonic() - t0 < 30
    child = int((repo / "pids").read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)

