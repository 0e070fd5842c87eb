"""trainlib/checkpoint.py and the resume checks, end to end: real train.py processes on the shared sample shards,
checkpoints changed on disk as a bad sector or a transfer would leave them, another shard set under the same
labels, a disk that fills up. What a resume checks and what a load verifies: docs/training.md."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import make_sample_data
import make_shards
from pipeline.shards.format import read_classes, read_manifest
from trainlib import checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "test_vit", "--img-size", "32", "--device", "cpu", "--workers", "1", "--lr", "3e-3",
        "--warmup-epochs", "1", "--no-plots"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(*argv) -> subprocess.CompletedProcess:
    """train.py in a process of its own, as a user or a launch script starts it."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def ran(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def flip_bytes(path: Path, count: int = 4) -> None:
    """`count` bytes in the middle of the file inverted in place, as a bad sector or a faulty copy leaves them."""
    with open(path, "r+b") as f:
        middle = f.seek(0, os.SEEK_END) // 2
        f.seek(middle)
        data = f.read(count)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in data))


def folder(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def train_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["global_step"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def other_sets(tmp_path_factory, sample_folder):
    """Two sets of the sample shards' sample count (48 train, 4 classes): one of other classes (the sample data's
    seed 1 draws other class ids), and the sample folder itself shuffled by another seed (the same classes and
    images in other shards)."""
    root = tmp_path_factory.mktemp("other-sets")
    args = ["--classes", "4", "--train-per-class", "12", "--val-per-class", "4", "--seed", "1", "--min-side", "64",
            "--max-side", "96", "--workers", "1"]
    assert make_sample_data.main([str(root / "folder"), *args]) == 0
    for src, dst, seed in ((root / "folder", root / "classes", "0"), (sample_folder, root / "shuffled", "1")):
        assert make_shards.main(["--data_path", str(src), "--out", str(dst), "--samples-per-shard", "10",
                                 "--workers", "1", "--seed", seed]) == 0
    return root / "classes", root / "shuffled"


def test_a_resume_onto_another_set_of_the_same_size_is_refused_before_any_file_and_taken_on_purpose(
        sample_shards, other_sets, tmp_path):
    other, shuffled = other_sets
    out = tmp_path / "run"
    common = ["--batch-size", "8", "--eval-freq", "0", "--output", out, "-p", "1"]
    ran(train("--data_path", sample_shards, "--epochs", "2", "--max-steps", "3", *common))
    before = folder(out)
    last = out / "last.pth"
    ours, theirs = read_classes(sample_shards), read_classes(other)

    refused = train("--data_path", other, "--epochs", "2", "--resume", "auto", *common)
    err = refused.stderr.strip()
    assert refused.returncode == 1 and err.count("\n") == 0, err[-3000:]
    assert err.startswith(f"train.py: error: --resume {last}: the checkpoint was trained on shard set "
                          f"{read_manifest(sample_shards).plan_id} (4 classes {ours[0]}..{ours[-1]}, 48 train "
                          f"samples, at {sample_shards}); --data_path {other} is set {read_manifest(other).plan_id} "
                          f"(4 classes {theirs[0]}..{theirs[-1]}, 48 train samples): classes differ (4 of 4; label 0 "
                          f"is {ours[0]} there, {theirs[0]} here); pass --resume-other-data to fine-tune"), err
    # The same images and classes in other shards: the position in an epoch means other samples there.
    refused = train("--data_path", shuffled, "--epochs", "2", "--resume", "auto", *common)
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0, refused.stderr[-3000:]
    assert ": the same classes, other train shards (another source, shuffle or shard size); pass " \
           "--resume-other-data" in refused.stderr
    assert folder(out) == before  # refused before any file of the run was written
    # An evaluation would score the labels against other classes.
    evaluated = train("--data_path", other, "--evaluate", "--resume", last, "--output", tmp_path / "eval")
    assert evaluated.returncode == 1 and "classes differ (4 of 4; " in evaluated.stderr
    assert "pass --resume-other-data to evaluate on it on purpose" in evaluated.stderr
    assert not (tmp_path / "eval").exists()

    # On purpose: its weights and optimizer state train a whole epoch of the other set, from its start.
    taken = ran(train("--data_path", other, "--epochs", "1", "--resume", "auto", "--resume-other-data", *common))
    assert "note: --resume-other-data: the checkpoint was trained on shard set " in taken.stdout
    assert "start epoch 0 of this set, with a new LR schedule" in taken.stdout
    state = checkpoint.load(last)
    assert (state["epoch"], state["global_step"]) == (1, 6)  # 48 samples / 8: one whole epoch of the other set
    assert state["data"]["plan_id"] == read_manifest(other).plan_id and state["data"]["classes"] == theirs
    assert train_steps(out)[-6:] == [1, 2, 3, 4, 5, 6]
    assert state["optimizer"]["state"][0]["step"].item() == 3 + 6  # the moments went on from the checkpoint's


def test_a_checkpoint_from_before_the_checks_resumes_with_a_note_on_what_was_not_checked(sample_shards, tmp_path):
    out = tmp_path / "run"
    common = ["--data_path", sample_shards, "--batch-size", "8", "--epochs", "2", "--eval-freq", "0", "--output", out]
    ran(train(*common, "--max-steps", "2"))
    state = checkpoint.load(out / "last.pth")
    for key in ("digest", "data"):  # what older checkpoints do not hold
        state.pop(key, None)
    torch.save(state, out / "last.pth")
    resumed = ran(train(*common, "--resume", "auto", "--max-steps", "3"))
    assert f"note: {out / 'last.pth'} carries no digest (written before checkpoints had one): its bytes could not " \
           f"be verified, only that its weights are finite" in resumed.stdout
    assert f"note: {out / 'last.pth'} records no shard set (written before checkpoints did, or on synthetic input): " \
           f"whether --data_path {sample_shards} is the data it was trained on could not be checked" in resumed.stdout
    assert checkpoint.load(out / "last.pth")["global_step"] == 3


def test_four_flipped_bytes_are_refused_and_resume_auto_falls_back_to_the_previous_checkpoint(sample_shards,
                                                                                            tmp_path):
    out = tmp_path / "run"
    common = ["--data_path", sample_shards, "--batch-size", "8", "--epochs", "2", "--eval-freq", "0", "--output", out]
    ran(train(*common, "--save-steps", "2", "--max-steps", "3", "-p", "1"))  # last.pth at step 2, then at 3
    last, previous = out / "last.pth", out / "previous.pth"
    flip_bytes(last)

    evaluated = train("--data_path", sample_shards, "--evaluate", "--resume", last, "--output", tmp_path / "eval")
    err = evaluated.stderr.strip()
    assert evaluated.returncode == 1 and err == (
        f"train.py: error: {last}: its contents do not match the digest saved with them (changed on disk or in "
        f"transfer since it was written): not a checkpoint to resume or evaluate"), err[-3000:]
    assert not (tmp_path / "eval").exists()

    resumed = ran(train(*common, "--resume", "auto", "--max-steps", "5", "-p", "1"))
    assert (f"note: --resume auto: {last}: its contents do not match the digest saved with them" in resumed.stdout
            and f"; resuming from {previous} (epoch 0, global step 2) instead" in resumed.stdout), resumed.stdout
    assert train_steps(out)[-3:] == [3, 4, 5]  # step 3 again, from the checkpoint before it
    # The flipped file was replaced without becoming previous.pth: that is still the good checkpoint it fell back to.
    assert checkpoint.load(last)["global_step"] == 5 and checkpoint.load(previous)["global_step"] == 2


def test_a_flipped_checkpoint_with_nothing_to_fall_back_to_is_one_line_and_touches_no_file(sample_shards, tmp_path):
    out = tmp_path / "run"
    common = ["--data_path", sample_shards, "--batch-size", "8", "--epochs", "2", "--eval-freq", "0", "--output", out]
    ran(train(*common, "--max-steps", "1"))  # one checkpoint: no previous.pth, and no best.pth without evaluation
    last = out / "last.pth"
    flip_bytes(last)
    before = folder(out)
    refused = train(*common, "--resume", "auto", "--max-steps", "3")
    err = refused.stderr.strip()
    assert refused.returncode == 1 and err.count("\n") == 0, err[-3000:]
    assert err.startswith(f"train.py: error: {last}: its contents do not match the digest saved with them")
    assert err.endswith("; --resume auto has no checkpoint to fall back to (no previous.pth, no best.pth): pass "
                        "--resume with a good one, or another --output to start afresh")
    assert folder(out) == before


def test_a_checkpoint_with_a_nan_weight_is_refused_by_the_finiteness_check(sample_shards, tmp_path):
    out = tmp_path / "run"
    ran(train("--data_path", sample_shards, "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
              "--eval-freq", "0", "--output", out))
    state = checkpoint.load(out / "last.pth")
    name = "blocks.0.attn.qkv.weight"
    state["model"][name].view(-1)[7] = math.nan
    nan = tmp_path / "nan.pth"
    checkpoint.save(nan, state)  # its digest is of the NaN: the bytes are as written, the weights are not usable
    evaluated = train("--data_path", sample_shards, "--evaluate", "--resume", nan, "--output", tmp_path / "eval")
    err = evaluated.stderr.strip()
    assert evaluated.returncode == 1 and err == (
        f"train.py: error: {nan}: model weight {name} holds NaN or inf: not a checkpoint to resume or evaluate"), \
        err[-3000:]
    assert not (tmp_path / "eval").exists()


def test_a_full_disk_reports_the_space_there_is_once_the_partial_file_is_gone(tmp_path):
    """vit_tiny's checkpoint (about 66 MiB with AdamW's moments) on a 40 MiB tmpfs: the line says what is free
    after the partial file is removed, which is what the next try has."""
    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        proc = train("--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0",
                     "--max-steps", "2", "--model", "vit_tiny_patch16_224", "--output", out)
        err = proc.stderr.strip()
        assert proc.returncode == 1 and err.count("\n") == 0, err[-3000:]
        found = re.search(r"last\.pth: no space left on device \((\d+) MiB free there, the checkpoint needs about "
                          r"(\d+) MiB\)", err)
        assert found, err
        free_now = shutil.disk_usage(out).free / 2**20
        assert int(found[1]) > 30 and abs(int(found[1]) - free_now) <= 1, (err, free_now)
        assert int(found[2]) > 40
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial file left
    finally:
        subprocess.run(["umount", str(out)], check=True)
