"""The ILSVRC2012 downloads as a source: shards byte-identical to an ImageFolder's, bad members named, resumable."""
import io
import json
import signal
import subprocess
import sys
import tarfile
import time

import make_shards
import pytest

from pipeline.shards import ilsvrc, repack
from pipeline.shards.detect import detect
from tests.shard_runs import interrupt_at_member, shard_files
from tests.shard_runs import run_make_shards as _run


@pytest.fixture(scope="module")
def downloads(sample_folder, tmp_path_factory):
    pytest.importorskip("scipy.io", reason="scipy is not installed: it writes and reads the devkit's meta.mat")
    return repack.write_ilsvrc(sample_folder, tmp_path_factory.mktemp("ilsvrc") / "imagenet")


def test_the_downloads_give_the_imagefolders_shards_byte_for_byte(downloads, sample_shards, tmp_path, capsys):
    assert detect(downloads) == "ilsvrc"
    dst = tmp_path / "shards"
    assert _run(downloads, dst, "--verify", workers=2) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"make_shards: {downloads} is the ILSVRC2012 downloads")
    assert "train: 48 files = 48 in 5 shards + 0 rejected + 0 ignored" in out and "verify: OK" in out
    assert shard_files(dst) == shard_files(sample_shards)
    # Nothing was extracted: the source folder holds only the three downloads.
    assert sorted(p.name for p in downloads.iterdir()) == sorted([ilsvrc.TRAIN_TAR, ilsvrc.VAL_TAR, ilsvrc.DEVKIT])


def test_devkit_labels_and_leaf_classes(downloads, sample_folder):
    wnid_of, truth = ilsvrc.read_devkit(downloads / ilsvrc.DEVKIT)
    classes = repack.classes_of(sample_folder)
    assert sorted(wnid_of.values()) == classes  # the parent synset (num_children > 0) is not a class
    val = {p.name: c for c, p in repack.images(sample_folder, "val")}
    for name, wnid in val.items():
        assert wnid_of[truth[int(name[15:23]) - 1]] == wnid


def test_val_without_the_devkit_is_one_line(downloads, tmp_path, capsys):
    src = tmp_path / "nodevkit"
    src.mkdir()
    (src / ilsvrc.VAL_TAR).symlink_to(downloads / ilsvrc.VAL_TAR)
    assert _run(src, tmp_path / "out") == make_shards.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ilsvrc.DEVKIT in err


def test_a_corrupt_image_in_a_class_tar_and_a_cut_train_tar_are_named(downloads, tmp_path, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    for name in (ilsvrc.VAL_TAR, ilsvrc.DEVKIT):
        (src / name).symlink_to(downloads / name)
    # Rebuild the train tar with one cut-off JPEG in the first class tar.
    with tarfile.open(downloads / ilsvrc.TRAIN_TAR) as outer, \
            tarfile.open(src / ilsvrc.TRAIN_TAR, "w", format=tarfile.USTAR_FORMAT) as out:
        members = outer.getmembers()
        for i, m in enumerate(members):
            data = outer.extractfile(m).read()
            if i == 0:
                inner_out = io.BytesIO()
                with tarfile.open(fileobj=io.BytesIO(data)) as inner, \
                        tarfile.open(fileobj=inner_out, mode="w", format=tarfile.USTAR_FORMAT) as new:
                    for j, im in enumerate(inner.getmembers()):
                        body = inner.extractfile(im).read()
                        if j == 0:
                            body = body[:len(body) // 2]
                            corrupt = f"{ilsvrc.TRAIN_TAR}/{m.name}/{im.name}"
                        im.size = len(body)
                        new.addfile(im, io.BytesIO(body))
                data = inner_out.getvalue()
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    dst = tmp_path / "out"
    assert _run(src, dst, "--check", "decode", "--no-restart-markers") == make_shards.EXIT_REJECTED
    rejected = {r["path"]: r["reason"] for r in json.loads((dst / "manifest.json").read_text())["rejected"]}
    assert list(rejected) == [corrupt] and rejected[corrupt].startswith("truncated JPEG")
    assert f"{corrupt}: " in capsys.readouterr().out

    # Cut the train tar inside its last class tar: every image that ends before the cut stays.
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in (ilsvrc.VAL_TAR, ilsvrc.DEVKIT):
        (cut / name).symlink_to(downloads / name)
    whole = (downloads / ilsvrc.TRAIN_TAR).read_bytes()
    with tarfile.open(downloads / ilsvrc.TRAIN_TAR) as outer:
        last = outer.getmembers()[-1]
        with tarfile.open(fileobj=outer.extractfile(last)) as inner:
            members = inner.getmembers()
    # the cut falls inside the data of the last class's 3rd image
    end = last.offset_data + members[2].offset_data + 100
    (cut / ilsvrc.TRAIN_TAR).write_bytes(whole[:end])
    dst = tmp_path / "out-cut"
    assert _run(cut, dst) == make_shards.EXIT_REJECTED
    manifest = json.loads((dst / "manifest.json").read_text())
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    lost = f"{ilsvrc.TRAIN_TAR}/{last.name}/{members[2].name}"
    assert list(rejected) == [lost] and "cut short" in rejected[lost]
    train = manifest["splits"]["train"]
    assert (train["num_samples"], train["num_rejected"]) == (48 - 12 + 2, 1)  # the last class keeps 2 of its 12
    assert train["num_files"] == train["num_samples"] + train["num_rejected"] + train["num_ignored"]


def test_a_train_tar_cut_between_class_tars_names_the_cut_and_the_missing_class(downloads, sample_shards, tmp_path):
    src = tmp_path / "cut"
    src.mkdir()
    for name in (ilsvrc.VAL_TAR, ilsvrc.DEVKIT):
        (src / name).symlink_to(downloads / name)
    with tarfile.open(downloads / ilsvrc.TRAIN_TAR) as outer:
        last = outer.getmembers()[-1]
    (src / ilsvrc.TRAIN_TAR).write_bytes((downloads / ilsvrc.TRAIN_TAR).read_bytes()[:last.offset])  # before its header
    dst = tmp_path / "out"
    assert _run(src, dst) == make_shards.EXIT_REJECTED
    manifest = json.loads((dst / "manifest.json").read_text())
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert "cut short or corrupt after 3 members" in rejected[ilsvrc.TRAIN_TAR]
    assert rejected[f"{ilsvrc.TRAIN_TAR}/{last.name}"] == "missing: the devkit lists this class"
    assert manifest["splits"]["train"]["num_samples"] == 36
    # The devkit's classes stand: every label is the ImageFolder's, val keeps the class whose train tar is lost.
    assert json.loads((dst / "classes.json").read_text()) == json.loads((sample_shards / "classes.json").read_text())
    assert manifest["splits"]["val"]["num_samples"] == 16
    assert {p.name: p.read_bytes() for p in dst.glob("val-*")} == {p.name: p.read_bytes()
                                                                   for p in sample_shards.glob("val-*")}


def test_an_interrupted_run_resumes_to_identical_bytes(downloads, sample_shards, tmp_path, monkeypatch):
    interrupt_at_member(monkeypatch, 55)
    dst = tmp_path / "shards"
    assert _run(downloads, dst) == 130
    assert (dst / "train-000001.tar").exists() and not (dst / "manifest.json").exists()
    monkeypatch.undo()
    assert _run(downloads, dst) == 0
    assert shard_files(dst) == shard_files(sample_shards)


def test_a_kill_9_mid_run_resumes_to_the_same_set(downloads, tmp_path):
    """A real SIGKILL of make_shards (one shard per sample, so the kill lands mid-run), then the same command."""
    cmd = [sys.executable, make_shards.__file__, "--data_path", str(downloads), "--samples-per-shard", "1",
           "--workers", "1"]
    whole, dst = tmp_path / "whole" / "set", tmp_path / "killed" / "set"  # _info.json holds the folder's name
    assert subprocess.run([*cmd, "--out", str(whole)], capture_output=True).returncode == 0
    proc = subprocess.Popen([*cmd, "--out", str(dst)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((dst / ".parts").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (dst / "manifest.json").exists()  # it died mid-run
    rerun = subprocess.run([*cmd, "--out", str(dst)], capture_output=True, text=True)
    assert rerun.returncode == 0 and "resuming: " in rerun.stdout
    assert shard_files(dst) == shard_files(whole) and not list(dst.glob(".*.tmp"))
