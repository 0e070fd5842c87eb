"""examples/: the loader in training loops as users write them (plain PyTorch, Lightning, Accelerate), each run as a
user runs it, in processes of its own: killed with SIGKILL in the middle of an epoch, after a checkpoint, and resumed.
The resumed run must train on the batches an uninterrupted run trains on from that checkpoint on.

The shard set here holds one train image per class, so a label names its sample: the labels each example logs per
step (`--log-labels`) are the samples it trained on. The kill comes from inside the run, at the moment the example
prints the step line named (`KILL_ON_LINE`): the whole process group (ranks and decode workers) gets SIGKILL there,
the same step on a fast machine and a slow one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import make_sample_data
import make_shards

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CLASSES = 48  # one train image each: 12 batches of 4 per epoch on one rank, 6 on each of two
COMMON = ["--batch-size", "4", "--img-size", "32", "--num-classes", str(CLASSES), "--workers", "1"]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}

# Runs an example as `python EXAMPLE ARGS` does, and sends the process group SIGKILL when its stdout gets a line that
# matches $KILL_ON_LINE. Lightning's DDP launcher starts the other ranks as `python EXAMPLE ARGS` (without this).
KILLER = r"""
import os, re, runpy, signal, sys
pattern = re.compile(os.environ.pop("KILL_ON_LINE"))

class KillOnLine:
    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text):
        n = self.stream.write(text)
        self.stream.flush()
        *lines, self.pending = (self.pending + text).split("\n")
        if any(pattern.search(line) for line in lines):
            os.killpg(0, signal.SIGKILL)
        return n

    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stdout = KillOnLine(sys.stdout)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def label_shards(tmp_path_factory) -> Path:
    """48 classes, one train image each: labels 0..47 name the samples."""
    base = tmp_path_factory.mktemp("one-per-class")
    assert make_sample_data.main([str(base / "folder"), "--classes", str(CLASSES), "--train-per-class", "1",
                                  "--val-per-class", "1", "--min-side", "40", "--max-side", "56", "--seed", "0",
                                  "--workers", "1"]) == 0
    assert make_shards.main(["--data_path", str(base / "folder"), "--out", str(base / "shards"),
                             "--samples-per-shard", "12", "--workers", "1"]) == 0
    return base / "shards"


def run(example: str, *args, kill_on: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The example in a process group of its own; with `kill_on`, SIGKILLed at that stdout line (and required to
    be: a run that ends before it fails the test)."""
    cmd = [sys.executable, str(EXAMPLES / example), *map(str, args)]
    env = ENV
    if kill_on:
        cmd[1:1] = ["-c", KILLER]
        env = {**ENV, "KILL_ON_LINE": kill_on}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (nothing, normally)
        except ProcessLookupError:
            pass
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if kill_on:
        assert proc.returncode == -signal.SIGKILL, f"not killed at {kill_on!r}:\n{out[-2000:]}\n{err[-3000:]}"
    else:
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    return result


def logged(path: Path) -> list[dict]:
    """The example's --log-labels lines; a line cut by the kill is not one."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1]]  # the text after the last newline was not finished


def by_step(entries: list[dict]) -> dict[int, list[int]]:
    steps = [e["step"] for e in entries]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {e["step"]: e["labels"] for e in entries}


def loader_labels(shards: Path, epochs: int) -> dict[int, list[int]]:
    """The labels of each step of an uninterrupted run: the loader's batches, one after the other (1-based steps)."""
    from pipeline import build_loader

    with build_loader(data_path=shards, split="train", backend="host", batch_size=4, device="cpu", img_size=32,
                      workers=1, seed=0) as loader:
        labels = [batch.labels.tolist() for _ in range(epochs) for batch in loader]
    return dict(enumerate(labels, start=1))


# -- plain PyTorch ------------------------------------------------------------------------------------------------


def test_plain_loop_killed_mid_epoch_resumes_on_the_same_samples_and_weights(label_shards, tmp_path):
    args = ["--data_path", label_shards, *COMMON, "--epochs", "2", "--ckpt-every", "5"]
    # 24 steps in 2 epochs of 12; checkpoints at steps 5, 10, 15, 20 and the end.
    run("plain_loop.py", *args, "--out", tmp_path / "whole", "--log-labels", tmp_path / "whole.jsonl")
    whole = by_step(logged(tmp_path / "whole.jsonl"))
    assert whole == loader_labels(label_shards, 2)  # the loader's epochs one after the other, without set_epoch
    for epoch in range(2):  # each epoch reads every sample once
        assert sorted(sum((whole[s] for s in range(12 * epoch + 1, 12 * epoch + 13)), [])) == list(range(CLASSES))

    out, log = tmp_path / "killed", tmp_path / "killed.jsonl"
    # Killed after step 18 (epoch 1, batch 6 of 12): the checkpoint of step 15 is the last.
    run("plain_loop.py", *args, "--out", out, "--log-labels", log, kill_on=r"^step 18 ")
    before = by_step(logged(log))
    assert sorted(before) == list(range(1, 19)) and all(before[s] == whole[s] for s in before)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 15 and (saved["loader"]["epoch"], saved["loader"]["batch"]) == (1, 3)

    log.unlink()
    resumed = run("plain_loop.py", *args, "--out", out, "--log-labels", log, "--resume")
    assert "resumed from" in resumed.stdout and "at step 15, epoch 1" in resumed.stdout
    assert by_step(logged(log)) == {s: whole[s] for s in range(16, 25)}  # steps 16-18 again: lost with the kill

    # On a CPU the steps are deterministic: the resumed run ends with the uninterrupted run's weights.
    end_whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    end_resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert end_whole["step"] == end_resumed["step"] == 24
    assert end_whole["loader"] == end_resumed["loader"]
    for name, tensor in end_whole["model"].items():
        assert torch.equal(tensor, end_resumed["model"][name]), name


# -- Lightning ------------------------------------------------------------------------------------------------------


def lightning_checkpoint(path: Path) -> dict:
    """What a Lightning checkpoint says about where the fit stood: the step, and the loader's state it holds (with the
    batches of the epoch it counts as handed out, across layouts, as Lightning counts them)."""
    ckpt = torch.load(path, weights_only=False)  # Lightning's own file: more than tensors and plain data
    states = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert len(states) == 1, states
    return {"step": ckpt["global_step"], "epoch": ckpt["epoch"], "loader": states[0],
            "counted": states[0]["batch"], "model": ckpt["state_dict"]}


def test_lightning_killed_mid_epoch_resumes_on_the_same_samples(label_shards, tmp_path):
    pytest.importorskip("lightning")
    args = ["--data_path", label_shards, *COMMON, "--cpu", "--epochs", "2", "--ckpt-every", "5"]
    whole = loader_labels(label_shards, 2)  # what an uninterrupted fit trains on, step by step
    assert len(whole) == 24

    out, log = tmp_path / "run", tmp_path / "killed.jsonl"
    # Killed after step 18 (epoch 1, batch 6 of 12): the checkpoint of step 15 is the last.
    run("lightning_loop.py", *args, "--out", out, "--log-labels", log, kill_on=r"^step 18 ")
    assert by_step(logged(log)) == {s: whole[s] for s in range(1, 19)}
    last = lightning_checkpoint(out / "checkpoints" / "last.ckpt")
    assert (last["step"], last["counted"]) == (15, 3) and (last["loader"]["epoch"], last["loader"]["batch"]) == (1, 3)

    log = tmp_path / "resumed.jsonl"
    run("lightning_loop.py", *args, "--out", out, "--log-labels", log, "--resume")
    assert by_step(logged(log)) == {s: whole[s] for s in range(16, 25)}  # steps 16-18 again: lost with the kill
    assert [e["batch_idx"] for e in logged(log)] == list(range(3, 12))
    end = lightning_checkpoint(out / "checkpoints" / "last.ckpt")
    assert end["step"] == 24 and (end["loader"]["epoch"], end["loader"]["batch"]) == (2, 0)


def test_lightning_ddp_killed_mid_epoch_resumes_on_one_device_then_on_two_with_the_rest_of_the_epoch(label_shards,
                                                                                                     tmp_path):
    pytest.importorskip("lightning")
    args = ["--data_path", label_shards, *COMMON, "--cpu", "--epochs", "3", "--ckpt-every", "2"]
    out = tmp_path / "run"

    def epoch_labels(log: Path, ranks: int, epoch: int, steps: range) -> list[int]:
        paths = [Path(f"{log}.rank{r}") for r in range(ranks)] if ranks > 1 else [log]
        return sum((e["labels"] for p in paths for e in logged(p) if e["epoch"] == epoch and e["step"] in steps), [])

    # 2 devices, 6 steps per epoch: killed after step 9 (epoch 1, batch 3 of 6); the checkpoint of step 8 is the last.
    run("lightning_loop.py", *args, "--devices", "2", "--out", out, "--log-labels", tmp_path / "a.jsonl",
        kill_on=r"^step 9 ")
    assert sorted(epoch_labels(tmp_path / "a.jsonl", 2, 0, range(1, 7))) == list(range(CLASSES))
    last = lightning_checkpoint(out / "checkpoints" / "last.ckpt")
    assert (last["step"], last["counted"]) == (8, 2) and last["loader"]["world_size"] == 2
    read = epoch_labels(tmp_path / "a.jsonl", 2, 1, range(7, 9))  # 2 steps of 2 x 4 samples

    # Resumed on 1 device: the 32 samples left of epoch 1 are 8 batches there, counted on from 2 (steps 9-16).
    # Killed after step 13; the checkpoint of step 12 is the last: 4 batches of the rest read.
    run("lightning_loop.py", *args, "--devices", "1", "--out", out, "--log-labels", tmp_path / "b.jsonl",
        "--resume", kill_on=r"^step 13 ")
    last = lightning_checkpoint(out / "checkpoints" / "last.ckpt")
    assert (last["step"], last["counted"]) == (12, 6) and last["loader"]["world_size"] == 1
    read += epoch_labels(tmp_path / "b.jsonl", 1, 1, range(9, 13))
    assert len(read) == 32 and len(set(read)) == 32

    # Resumed on 2 devices again: the last 16 samples of epoch 1 are 2 steps there (13-14), then epoch 2 is whole.
    run("lightning_loop.py", *args, "--devices", "2", "--out", out, "--log-labels", tmp_path / "c.jsonl", "--resume")
    rest = epoch_labels(tmp_path / "c.jsonl", 2, 1, range(13, 15))
    assert sorted(read + rest) == list(range(CLASSES))  # each sample of epoch 1 once, over the three runs
    assert epoch_labels(tmp_path / "c.jsonl", 2, 1, range(0, 100)) == rest  # and nothing else in epoch 1
    assert sorted(epoch_labels(tmp_path / "c.jsonl", 2, 2, range(15, 21))) == list(range(CLASSES))
    assert lightning_checkpoint(out / "checkpoints" / "last.ckpt")["step"] == 20


# -- Accelerate -----------------------------------------------------------------------------------------------------


def test_accelerate_killed_mid_epoch_resumes_on_the_same_samples_and_weights(label_shards, tmp_path):
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    args = ["--data_path", label_shards, *COMMON, "--cpu", "--epochs", "2", "--ckpt-every", "5"]
    run("accelerate_loop.py", *args, "--out", tmp_path / "whole", "--log-labels", tmp_path / "whole.jsonl")
    whole = by_step(logged(tmp_path / "whole.jsonl"))
    assert sorted(whole) == list(range(1, 25))

    out, log = tmp_path / "killed", tmp_path / "killed.jsonl"
    run("accelerate_loop.py", *args, "--out", out, "--log-labels", log, kill_on=r"^step 18 ")
    before = by_step(logged(log))
    assert sorted(before) == list(range(1, 19)) and all(before[s] == whole[s] for s in before)
    assert (out / "latest").read_text().strip() == "step-15"
    saved = torch.load(out / "step-15" / "custom_checkpoint_0.pkl", weights_only=True)  # the loader's state
    assert (saved["epoch"], saved["batch"]) == (1, 3)

    log.unlink()
    resumed = run("accelerate_loop.py", *args, "--out", out, "--log-labels", log, "--resume")
    assert "at step 15, epoch 1" in resumed.stdout
    assert by_step(logged(log)) == {s: whole[s] for s in range(16, 25)}
    end_whole = load_file(tmp_path / "whole" / "step-24" / "model.safetensors")
    end_resumed = load_file(out / "step-24" / "model.safetensors")
    assert end_whole.keys() == end_resumed.keys()
    for name, tensor in end_whole.items():
        assert torch.equal(tensor, end_resumed[name]), name
