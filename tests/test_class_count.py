"""The class count a run trains with: manifest.json's num_classes and classes.json agree, or a real start of train.py
refuses the set in one line before its run folder appears (pipeline/shards/format.py `read_manifest`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_start_on_a_manifest_counting_other_classes_than_classes_json_refuses_in_one_line(sample_shards, tmp_path):
    """A manifest edited to 10 classes beside a classes.json of 4 trained a 10-way head and exited 0."""
    data = tmp_path / "shards"
    shutil.copytree(sample_shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["num_classes"] == 4
    (data / "manifest.json").write_text(json.dumps({**manifest, "num_classes": 10}))
    run = tmp_path / "run"
    proc = start(data, run)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert proc.stderr.splitlines() == [
        f"train.py: error: {data / 'manifest.json'}: num_classes is 10, but {data / 'classes.json'} lists 4 classes; "
        f"the two files are not of the same shard set (one edited, or copied from another); remake the set"], \
        proc.stderr[-2000:]
    assert not run.exists()


def test_a_start_on_a_set_without_its_class_list_refuses_in_one_line(sample_shards, tmp_path):
    """Its checkpoints could not record which classes they were trained on, so no resume could check them."""
    data, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_shards, data)
    (data / "classes.json").unlink()
    proc = start(data, run)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert proc.stderr.splitlines() == [f"train.py: error: {data / 'classes.json'}: no class list here; remake the set "
                                        f"with tools/make_shards.py"], proc.stderr[-2000:]
    assert not run.exists()


def start(data: Path, run: Path) -> subprocess.CompletedProcess:
    """A real start of train.py on the shard set `data`, into the run folder `run`."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--data_path", str(data), "--backend", "host",
                           "--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--epochs", "1",
                           "--batch-size", "8", "--workers", "1", "--output", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
