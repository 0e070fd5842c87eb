"""pipeline/shards/format.py: the shard set's files are written and read in one place; bad files fail in one line
that names them."""
from __future__ import annotations

import json

import pytest

from pipeline.shards.errors import ShardError
from pipeline.shards.format import (FORMAT, MANIFEST, Manifest, Settings, ShardInfo, SplitInfo, index_line, index_text,
                                    is_shard_file, num_classes, read_index, read_manifest, shard_list, write_set_files)


def small_manifest() -> Manifest:
    shards = [ShardInfo("train-000000.tar", "train-000000.idx", 3, 4096, "ab" * 32)]
    return Manifest(Settings(seed=7, samples_per_shard=3, source="/src"), "0123456789abcdef", 5,
                    {"train": SplitInfo(3, 4096, 4, 1, 0, shards)},
                    rejected=[{"split": "train", "path": "train/a/x.JPEG", "reason": "empty file (0 bytes)"}])


def test_manifest_round_trips_and_keeps_the_file_layout(tmp_path):
    manifest = small_manifest()
    write_set_files(tmp_path, manifest, ["a", "b", "c", "d", "e"])
    assert read_manifest(tmp_path) == manifest
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    # Settings sit at the top level beside the splits, as in every shard set written so far.
    assert on_disk["seed"] == 7 and on_disk["format"] == FORMAT == "vitshards-2" and "settings" not in on_disk
    assert on_disk["splits"]["train"]["shards"][0]["sha256"] == "ab" * 32
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["splits"]["train"]["filenames"] == ["train-000000.tar"]
    assert num_classes(tmp_path) == 5


def test_a_vitshards_1_manifest_is_read_by_its_own_rule(tmp_path):
    write_set_files(tmp_path, small_manifest(), ["a", "b"])
    obj = json.loads((tmp_path / MANIFEST).read_text())
    obj["format"] = "vitshards-1"  # as sets were written before the fields came: no class count, no restart markers
    del obj["num_classes"], obj["restart_markers"]
    (tmp_path / MANIFEST).write_text(json.dumps(obj))
    manifest = read_manifest(tmp_path)
    assert manifest.num_classes == 2 and num_classes(tmp_path) == 2  # classes.json's count
    assert manifest.settings.restart_markers is False and manifest.settings.format == "vitshards-1"
    (tmp_path / "classes.json").unlink()  # then the count has nowhere to come from
    with pytest.raises(ShardError, match=r"classes.json: no class list, which this manifest's class count is taken"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"format": "vitshards-9"}, "shard format 'vitshards-9', which this version does not read (it reads "
                                "vitshards-1, vitshards-2)"),
    ({"format": None}, "shard format None"),
    ({"num_classes": None}, "not a manifest written by tools/make_shards.py (KeyError: 'num_classes')"),
    ({"restart_markers": None}, "a vitshards-2 manifest without restart_markers"),
])
def test_a_manifest_of_another_format_or_missing_a_field_is_refused_in_one_line(tmp_path, change, message):
    write_set_files(tmp_path, small_manifest(), ["a", "b"])
    obj = json.loads((tmp_path / MANIFEST).read_text())
    for key, value in change.items():
        if value is None:
            del obj[key]
        else:
            obj[key] = value
    (tmp_path / MANIFEST).write_text(json.dumps(obj))
    with pytest.raises(ShardError) as e:
        read_manifest(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["[]", "{}", '{"splits": {"train": {"shards": [{"name": "x"}]}}}', "{not json"])
def test_a_foreign_manifest_fails_in_one_line_naming_it(tmp_path, text):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(ShardError, match="manifest") as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and "\n" not in str(e.value)


def test_missing_manifest_and_missing_shard_are_named(tmp_path):
    with pytest.raises(ShardError, match="no shard manifest here"):
        read_manifest(tmp_path)
    write_set_files(tmp_path, small_manifest(), list("abcde"))  # small_manifest counts 5
    with pytest.raises(ShardError, match="train-000000.tar: listed in the manifest but missing"):
        shard_list(tmp_path, "train")
    with pytest.raises(ShardError, match="no 'val' shards"):
        shard_list(tmp_path, "val")


def test_index_round_trips_and_checks_counts(tmp_path):
    lines = [index_line("n01_1", [("jpg", 512, 100), ("cls", 1536, 1)]),
             index_line("n01_2", [("jpg", 2048, 7), ("cls", 2560, 2)])]
    path = tmp_path / "train-000000.idx"
    path.write_text(index_text(lines))
    assert path.read_text().splitlines()[:2] == ["v1.2 2", "jpg 512 100 n01_1.jpg cls 1536 1 n01_1.cls"]
    assert read_index(path, 2) == [("n01_1", {"jpg": (512, 100), "cls": (1536, 1)}),
                                   ("n01_2", {"jpg": (2048, 7), "cls": (2560, 2)})]
    with pytest.raises(ShardError, match="manifest says 3"):
        read_index(path, 3)
    path.write_text("v1.1 2\n")
    with pytest.raises(ShardError, match="not a wds2idx v1.2 index"):
        read_index(path)


@pytest.mark.parametrize("line, message", [
    ("jpg x1 100 a.jpg cls 1536 1 a.cls", r"train-000000\.idx:2: a\.jpg: offset 'x1' and size '100' must be byte "
                                          r"counts"),
    ("jpg 512 \u00b2 a.jpg cls 1536 1 a.cls", "must be byte counts"),  # a digit to str.isdigit, not to int()
    ("jpg 512 1000000000000 a.jpg cls 1536 1 a.cls", r"a\.jpg at bytes 512-1000000000512 ends past the tar's 4096 "
                                                    r"bytes"),
    ("jpg 512 2000 a.jpg cls 1536 1 a.cls", r"a\.cls at bytes 1536-1537 overlaps a\.jpg \(bytes 512-2512\)"),
    ("cls 1536 1 a.cls jpg 512 2000 a.jpg", r"a\.cls at bytes 1536-1537 overlaps a\.jpg"),  # in any listed order
])
def test_an_index_the_writer_cannot_have_written_is_one_line_naming_it(tmp_path, line, message):
    path = tmp_path / "train-000000.idx"
    path.write_text(index_text([line]))
    with pytest.raises(ShardError, match=message) as e:
        read_index(path, 1, file_bytes=4096)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_an_index_in_another_order_than_the_tars_still_reads(tmp_path):
    lines = [index_line("b", [("cls", 3072, 1), ("jpg", 2048, 7)]),
             index_line("a", [("jpg", 512, 100), ("cls", 1536, 1)])]
    path = tmp_path / "train-000000.idx"
    path.write_text(index_text(lines))
    assert read_index(path, 2, file_bytes=4096) == [("b", {"cls": (3072, 1), "jpg": (2048, 7)}),
                                                    ("a", {"jpg": (512, 100), "cls": (1536, 1)})]


@pytest.mark.parametrize("where, value, message", [
    (("splits", "train", "num_samples"), -1, "splits.train.num_samples"),
    (("splits", "train", "shards", 0, "num_samples"), -3, "train-000000.tar: num_samples is -3"),
    (("splits", "train", "shards", 0, "num_samples"), "3", "train-000000.tar: num_samples is '3'"),
    (("splits", "train", "num_samples"), 4, "splits.train.num_samples (its shards hold 3) is 4"),
    (("splits", "train", "shards", 0, "sha256"), "not-a-hash", "train-000000.tar: sha256 is 'not-a-hash'"),
    (("splits", "train", "shards", 0, "name"), "../../etc/passwd", "the shard file names of splits.train"),
])
def test_a_manifest_with_impossible_numbers_is_one_line(tmp_path, where, value, message):
    write_set_files(tmp_path, small_manifest(), ["a"])
    obj = json.loads((tmp_path / MANIFEST).read_text())
    node = obj
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = value
    (tmp_path / MANIFEST).write_text(json.dumps(obj))
    with pytest.raises(ShardError) as e:
        read_manifest(tmp_path)
    assert message in str(e.value) and str(tmp_path / MANIFEST) in str(e.value) and "\n" not in str(e.value)


def test_a_shard_of_another_size_than_the_manifests_gets_a_problem(tmp_path):
    write_set_files(tmp_path, small_manifest(), list("abcde"))  # small_manifest counts 5
    (tmp_path / "train-000000.idx").write_text(index_text([]))
    (tmp_path / "train-000000.tar").write_bytes(bytes(4096))
    assert shard_list(tmp_path, "train")[0].problem is None
    (tmp_path / "train-000000.tar").write_bytes(bytes(4608))
    shard = shard_list(tmp_path, "train")[0]
    assert shard.problem.startswith("4608 bytes, the manifest says 4096: not the shard this set was made with")


def test_shard_file_names():
    assert is_shard_file("train-000012.tar") and is_shard_file("val-000000.idx")
    assert not is_shard_file("train-12.tar") and not is_shard_file("test-000000.tar") and not is_shard_file("x.tar")


def test_a_class_count_that_is_not_the_class_lists_length_is_refused_in_one_line(tmp_path):
    """manifest.json's num_classes sizes the head, classes.json gives the labels their meaning: a set whose two
    files disagree (one edited, or copied from another set) trained a head of the manifest's width."""
    write_set_files(tmp_path, small_manifest(), list("abcd"))  # small_manifest counts 5
    for read in (read_manifest, num_classes):
        with pytest.raises(ShardError) as e:
            read(tmp_path)
        message = str(e.value)
        assert "\n" not in message and f"{tmp_path / MANIFEST}: num_classes is 5, but " \
            f"{tmp_path / 'classes.json'} lists 4 classes" in message
    (tmp_path / "classes.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ShardError, match="classes.json: not a list of class names"):
        read_manifest(tmp_path)
