"""Existing webdataset tars as a source: re-sharded to the ImageFolder's shards, bad members named."""
import json
import tarfile

import make_shards
import pytest

from pipeline.shards import repack
from pipeline.shards.detect import detect
from pipeline.shards.source import split_of
from tests.shard_runs import run_make_shards as _run
from tests.shard_runs import shard_files


@pytest.fixture(scope="module")
def wds_set(sample_folder, tmp_path_factory):
    # Written with webdataset's ShardWriter; make_shards reads such tars without it, so the other tests still run.
    pytest.importorskip("webdataset", reason="webdataset is not installed: it writes this source's tars")
    return repack.write_wds(sample_folder, tmp_path_factory.mktemp("wds") / "set")


def test_webdataset_tars_give_the_imagefolders_shards_byte_for_byte(wds_set, sample_shards, tmp_path, capsys):
    assert detect(wds_set) == "wds"
    dst = tmp_path / "shards"
    assert _run(wds_set, dst, "--verify", workers=2) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"make_shards: {wds_set} is webdataset tars")
    assert "train: 48 files = 48 in 5 shards" in out and "verify: OK" in out
    assert shard_files(dst) == shard_files(sample_shards)


def test_our_own_shards_are_a_source_too(sample_shards, tmp_path):
    # An older set of ours, re-sharded (say with --max-side): its tars are webdataset tars, its classes.json is read.
    dst = tmp_path / "again"
    assert _run(sample_shards, dst, "--max-side", "48") == 0
    assert (dst / "classes.json").read_bytes() == (sample_shards / "classes.json").read_bytes()
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 48 and len(manifest["converted"]) == 64


def test_split_names_and_detection(tmp_path, sample_folder):
    assert [split_of(n) for n in ("imagenet1k-train-0001.tar", "val/000.tar", "x-validation-1.tar", "a.tar")] \
        == ["train", "val", "val", None]
    assert detect(sample_folder) == "imagefolder"
    stray = tmp_path / "folder"
    (stray / "train" / "n01").mkdir(parents=True)
    (stray / "backup.tar").write_bytes(b"")
    (stray / "extra").mkdir()
    (stray / "extra" / "train-stats.parquet").write_bytes(b"")
    assert detect(stray) == "imagefolder"  # class folders win over a stray tar or parquet file
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "data.tar").write_bytes(b"")
    assert detect(tmp_path / "odd") == "wds"
    assert _run(tmp_path / "odd", tmp_path / "out") == make_shards.EXIT_USAGE


def test_bad_samples_and_a_cut_tar_are_named(wds_set, tmp_path, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    with tarfile.open(wds_set / "train-000000.tar") as tar:
        jpg = tar.extractfile(next(m for m in tar if m.name.endswith(".jpg"))).read()
    with tarfile.open(src / "train-000000.tar", "w") as tar:
        repack.add_bytes(tar, "a.jpg", jpg[:len(jpg) // 2])
        repack.add_bytes(tar, "a.cls", b"0")
        repack.add_bytes(tar, "b.jpg", jpg)  # no label
        repack.add_bytes(tar, "c.cls", b"1")  # no image
        repack.add_bytes(tar, "d.jpg", jpg)
        repack.add_bytes(tar, "d.cls", b"cat")  # not a number
        repack.add_bytes(tar, "__meta__.json", b"{}")
        repack.add_bytes(tar, "e.jpg", jpg)
        repack.add_bytes(tar, "e.cls", b"2")
        repack.add_bytes(tar, "e.json", b"{}")  # not carried
    # A second tar, cut inside the image of its second sample: the first sample stays.
    with tarfile.open(wds_set / "train-000001.tar") as tar:
        cut = [m for m in tar if m.name.endswith(".jpg")][1]
    second = (wds_set / "train-000001.tar").read_bytes()
    (src / "train-000001.tar").write_bytes(second[:cut.offset_data + cut.size // 2])
    dst = tmp_path / "out"
    assert _run(src, dst, "--no-restart-markers") == make_shards.EXIT_REJECTED
    m = json.loads((dst / "manifest.json").read_text())
    rejected = {r["path"]: r["reason"] for r in m["rejected"]}
    assert set(rejected) == {"train-000000.tar/a", "train-000000.tar/b", "train-000000.tar/c", "train-000000.tar/d",
                             f"train-000001.tar/{cut.name[:-4]}"}
    assert rejected["train-000000.tar/a"].startswith("truncated JPEG")
    assert rejected["train-000000.tar/b"] == "no .cls member"
    assert "cut short" in rejected[f"train-000001.tar/{cut.name[:-4]}"]
    assert [i["path"] for i in m["ignored"]] == ["train-000000.tar/__meta__"]
    train = m["splits"]["train"]
    assert (train["num_samples"], train["num_rejected"], train["num_ignored"]) == (2, 5, 1)
    out = capsys.readouterr().out
    assert "train: 8 files = 2 in 1 shards + 5 rejected + 1 ignored" in out
