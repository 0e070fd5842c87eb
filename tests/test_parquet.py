"""Hugging Face parquet files as a source: the ImageFolder's samples, labels and classes; bad rows named; the windowed
plan mixes classes and resumes."""
import json
import shutil

import make_shards
import pytest

from pipeline.shards import parquet, repack
from pipeline.shards.detect import detect
from tests.shard_runs import interrupt_at_member
from tests.shard_runs import run_make_shards as _run

NO_PYARROW = "pyarrow is not installed: it writes and reads the parquet source"
pa = pytest.importorskip("pyarrow", reason=NO_PYARROW)
pq = pytest.importorskip("pyarrow.parquet", reason=NO_PYARROW)


def samples(wds, dst):
    """(split, key) -> (label, image bytes) of every sample, as webdataset reads the shards."""
    out = {}
    for split in ("train", "val"):
        for s in wds.WebDataset([str(p) for p in sorted(dst.glob(f"{split}-*.tar"))], shardshuffle=False):
            out[(split, s["__key__"])] = (int(s["cls"]), s["jpg"])
    return out


@pytest.fixture(scope="module")
def hub(sample_folder, tmp_path_factory):
    return repack.write_parquet(sample_folder, tmp_path_factory.mktemp("hub") / "imagenet-1k")


def test_parquet_gives_the_imagefolders_samples(hub, sample_shards, tmp_path, capsys):
    wds = pytest.importorskip("webdataset", reason="webdataset is not installed: it reads the shards back here")
    assert detect(hub) == "parquet"
    dst = tmp_path / "shards"
    assert _run(hub, dst, "--verify", workers=2) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"make_shards: {hub} is Hugging Face parquet files")
    assert "train: 48 files = 48 in 5 shards + 0 rejected + 0 ignored" in out and "verify: OK" in out
    assert samples(wds, dst) == samples(wds, sample_shards)  # same keys, labels and (recoded or kept) bytes
    assert (dst / "classes.json").read_bytes() == (sample_shards / "classes.json").read_bytes()
    # The rows are in class order, yet each shard mixes classes.
    first = list(wds.WebDataset([str(dst / "train-000000.tar")], shardshuffle=False))
    assert len({int(s["cls"]) for s in first}) > 1


def test_without_class_names_the_classes_are_the_label_numbers(sample_folder, tmp_path):
    src = repack.write_parquet(sample_folder, tmp_path / "hub", with_names=False)
    dst = tmp_path / "shards"
    assert _run(src, dst) == 0
    assert json.loads((dst / "classes.json").read_text()) == ["0", "1", "2", "3"]


def test_a_null_image_and_a_missing_label_are_named(sample_folder, tmp_path, capsys):
    src = repack.write_parquet(sample_folder, tmp_path / "hub", files_per_split=1)
    path = src / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(path)
    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    images[3], labels[7] = None, None
    fixed = pa.table({"image": pa.array(images, type=table.schema.field("image").type),
                      "label": pa.array(labels, pa.int64())}).replace_schema_metadata(table.schema.metadata)
    pq.write_table(fixed, path, row_group_size=5)
    dst = tmp_path / "shards"
    assert _run(src, dst) == make_shards.EXIT_REJECTED
    rejected = {r["path"]: r["reason"] for r in json.loads((dst / "manifest.json").read_text())["rejected"]}
    rel = "data/train-00000-of-00001.parquet"
    assert rejected == {f"{rel}[3]": "no image bytes (null)", f"{rel}[7]": "no label (None)"}
    out = capsys.readouterr().out
    assert "train: 48 files = 46 in 5 shards + 2 rejected + 0 ignored" in out
    assert f"  {rel}[3]: no image bytes (null)" in out


def test_another_window_is_another_plan(hub, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "shards"
    assert _run(hub, dst, per_shard=2) == 0
    assert _run(hub, dst, per_shard=2) == 0  # the same plan: a finished set, nothing rebuilt
    monkeypatch.setattr(parquet, "WINDOW", 4)  # a later version's window would put samples in other shards
    assert _run(hub, dst, per_shard=2) == make_shards.EXIT_USAGE
    assert "holds shards of another data set or settings" in capsys.readouterr().err


def test_a_test_split_is_named_and_not_read(hub, tmp_path, capsys):
    src = tmp_path / "hub"
    shutil.copytree(hub, src)
    shutil.copy(src / "data" / "validation-00000-of-00002.parquet", src / "data" / "test-00000-of-00001.parquet")
    assert _run(src, tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert "not read, their names say no train or val split: data/test-00000-of-00001.parquet" in captured.err
    assert "val: 16 files = 16 in 2 shards" in captured.out


def test_a_file_that_is_not_parquet_is_one_line(sample_folder, tmp_path, capsys):
    src = repack.write_parquet(sample_folder, tmp_path / "hub")
    (src / "data" / "train-00001-of-00002.parquet").write_bytes(b"not parquet at all")
    assert _run(src, tmp_path / "out") == make_shards.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "parquet" in err


def test_windows_of_shards_resume_after_an_interrupt(hub, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert _run(hub, whole, per_shard=2) == 0  # 24 train shards: two windows of 16 and 8
    interrupt_at_member(monkeypatch, 2 * 2 * 20)  # 40 samples written: inside the second train window
    dst = tmp_path / "shards"
    assert _run(hub, dst, per_shard=2) == 130
    assert (dst / "train-000015.tar").exists() and not (dst / "train-000016.tar").exists()
    monkeypatch.undo()
    assert _run(hub, dst, per_shard=2) == 0
    for p in whole.glob("*-*.tar"):
        assert (dst / p.name).read_bytes() == p.read_bytes()
