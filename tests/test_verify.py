"""pipeline/shards/verify.py: a shard set checked against its manifest and its source tree, read as the loaders read
it. Each test breaks one thing and keeps the sha256 in the manifest matching, so the check behind it is reached."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import pytest

from pipeline.shards import verify
from pipeline.shards.format import read_manifest
from pipeline.shards.imagefolder import scan


@pytest.fixture
def copy(sample_shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(sample_shards, dst)
    return dst


def problems(sample_folder, dst) -> list[str]:
    return verify.verify(dst, scan(sample_folder), read_manifest(dst))


def rehash(dst, name: str) -> None:
    """The manifest's size and sha256 of shard `name`, as they now are."""
    manifest = json.loads((dst / "manifest.json").read_text())
    data = (dst / name).read_bytes()
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_an_untouched_set_has_no_problem(sample_folder, copy):
    assert problems(sample_folder, copy) == []


def test_an_index_that_points_elsewhere_is_named(sample_folder, copy):
    lines = (copy / "val-000000.idx").read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # two samples' lines swapped: the offsets no longer follow the tar
    (copy / "val-000000.idx").write_text("\n".join(lines) + "\n")
    found = problems(sample_folder, copy)
    assert any(p.startswith("val-000000.idx: does not match the members of val-000000.tar (member 0 of the tar is ")
               for p in found), found


def test_a_wrong_label_is_named_with_its_source_file(sample_folder, copy):
    data = bytearray((copy / "val-000000.tar").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar if m.name.endswith(".cls"))
    label = int(data[member.offset_data:member.offset_data + member.size])
    data[member.offset_data] = ord(str((label + 1) % 4))  # the same length, another class
    (copy / "val-000000.tar").write_bytes(bytes(data))
    rehash(copy, "val-000000.tar")
    key = member.name.removesuffix(".cls")
    found = problems(sample_folder, copy)
    assert any(p.startswith(f"val-000000.tar/{key}: label {(label + 1) % 4}, expected {label} (val/") for p in found)


def test_a_label_that_is_no_number_is_named_as_the_loaders_name_it(sample_folder, copy):
    data = bytearray((copy / "val-000001.tar").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar if m.name.endswith(".cls"))
    data[member.offset_data] = ord("x")
    (copy / "val-000001.tar").write_bytes(bytes(data))
    rehash(copy, "val-000001.tar")
    found = problems(sample_folder, copy)
    assert any(".cls is not a decimal label" in p and member.name.removesuffix(".cls") in p for p in found), found
