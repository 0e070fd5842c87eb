"""tools/bench_shards.py: reading vs sharding the same files, one JSON line per measurement."""
import json

import bench_shards
import pytest

from pipeline.shards.jpeg import decoder_available


def test_it_times_reading_and_each_kind_of_sharding(sample_folder, tmp_path, capsys):
    assert bench_shards.main(["--data_path", str(sample_folder), "--workers", "1", "--repeats", "1",
                              "--tmp", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [line["bench"] for line in lines]
    expected = ["cat", "copy", "make_shards --no-restart-markers --check decode",
                "make_shards --no-restart-markers --check header"]
    assert names == expected + (["make_shards --restart-markers"] if decoder_available("region") else [])
    assert all(line["images"] == 64 and line["images_per_s"] > 0 for line in lines)
    assert not list(tmp_path.iterdir())  # its shards are deleted afterwards


def test_an_empty_source_is_one_error(tmp_path, capsys):
    assert bench_shards.main(["--data_path", str(tmp_path)]) == 2
    assert "no files" in capsys.readouterr().err


def test_sources_times_make_shards_from_each_form_and_counts_its_reads(sample_folder, tmp_path, capsys):
    # The forms are written first: ILSVRC's devkit with scipy, parquet files with pyarrow, tars with webdataset.
    for name, package in (("scipy.io", "scipy"), ("pyarrow.parquet", "pyarrow"), ("webdataset", "webdataset")):
        pytest.importorskip(name, reason=f"{package} is not installed: it writes one of the source forms")
    assert bench_shards.main(["--data_path", str(sample_folder), "--workers", "1", "--repeats", "1",
                              "--samples-per-shard", "10", "--tmp", str(tmp_path), "--sources"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    forms = ["imagefolder", "ilsvrc", "parquet", "wds"]
    assert [line["bench"] for line in lines] == [f"make_shards from {f}, {s}" for s in bench_shards.SOURCE_SETTINGS
                                                 for f in forms]
    assert all(line["images"] == 64 and line["ratio_vs_imagefolder"] > 0 for line in lines)
    assert lines[0]["ratio_vs_imagefolder"] == 1.0
    # Each form is read about once (imports and per-run files make the small rest).
    assert all(0.5 < line["read_vs_cat"] < 10 for line in lines)
    assert not list(tmp_path.iterdir())
