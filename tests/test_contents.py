"""pipeline/shards/contents.py: each shard's bytes against the manifest's sha256 and its index against the tar's
members, once per copy of the files (a cache of markers); tools/check_shards.py, the same check as a command."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.shards import contents
from pipeline.shards.format import read_index, read_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data(sample_shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(sample_shards, dst)
    return dst


def check(data: Path, cache: Path, **kw) -> contents.Checked:
    return contents.check(str(data), read_manifest(data), ["train", "val"], cache=cache, **kw)


def flip_a_byte(path: Path, at: int = 2000) -> None:
    """The same size, other bytes: what no size check sees (a byte of the first image's data)."""
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_a_clean_set_passes_and_is_read_once_per_copy(data, tmp_path):
    cache = tmp_path / "cache"
    first = check(data, cache)
    shards = sum(len(s.shards) for s in read_manifest(data).splits.values())
    assert first.problems == {} and first.shards_read == shards and first.already_verified == 0
    assert first.bytes_read == sum(p.stat().st_size for p in data.glob("*.tar"))
    again = check(data, cache)
    assert again.shards_read == 0 and again.already_verified == shards
    copy = tmp_path / "copy"  # another copy of the same files is checked on its own
    shutil.copytree(data, copy)
    assert check(copy, cache).shards_read == shards


def test_a_same_size_change_after_the_check_is_found_at_the_next(data, tmp_path):
    cache = tmp_path / "cache"
    assert check(data, cache).problems == {}
    flip_a_byte(data / "train-000001.tar")
    found = check(data, cache)
    assert found.shards_read == 1 and list(found.problems) == ["train-000001.tar"]
    assert "the manifest says" in found.problems["train-000001.tar"]


def test_a_shard_changed_back_to_its_old_time_is_still_read_again(data, tmp_path):
    """`touch -r` (or cp -p, rsync -t) can restore a file's mtime; its ctime and inode tell the copy apart."""
    cache, tar = tmp_path / "cache", data / "train-000002.tar"
    assert check(data, cache).problems == {}
    before = tar.stat()
    flip_a_byte(tar)
    os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert list(check(data, cache).problems) == ["train-000002.tar"]


def test_a_wrong_sha256_in_the_manifest_is_found_even_for_a_known_copy(data, tmp_path):
    cache = tmp_path / "cache"
    assert check(data, cache).problems == {}
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    (data / "manifest.json").write_text(json.dumps(manifest))
    found = check(data, cache)
    assert list(found.problems) == ["val-000000.tar"] and "the manifest says 0000000000000000" in \
        found.problems["val-000000.tar"]


def test_an_index_that_pairs_an_image_with_another_samples_label_is_found(data, tmp_path):
    """Two samples' .cls entries swapped: every count and range is still consistent, only the tar's own member
    order tells."""
    idx = data / "train-000000.idx"
    head, *lines = idx.read_text().splitlines()
    first, second = lines[0].split(), lines[1].split()
    first[4:8], second[4:8] = second[4:8], first[4:8]  # "cls OFFSET SIZE key.cls"
    idx.write_text("\n".join([head, " ".join(first), " ".join(second), *lines[2:]]) + "\n")
    assert len(read_index(idx)) == 10  # the loader's own checks pass it
    found = check(data, tmp_path / "cache")
    assert list(found.problems) == ["train-000000.tar"]
    assert "train-000000.idx does not list its members: member 1 of the tar is" in found.problems["train-000000.tar"]


def test_parts_split_the_shards_between_ranks(data, tmp_path):
    parts = [check(data, tmp_path / f"cache{i}", part=(i, 3)) for i in range(3)]
    assert [p.shards_read for p in parts] == [3, 2, 2]  # 7 shards, every third from the i-th
    merged = contents.Checked()
    for p in parts:
        merged.merge(p)
    assert merged.shards_read == 7 and merged.bytes_read == sum(p.bytes_read for p in parts)


def test_a_cache_that_cannot_be_written_is_one_note_and_the_check_still_runs(data, tmp_path):
    (tmp_path / "file").write_text("")
    flip_a_byte(data / "val-000001.tar")
    found = check(data, tmp_path / "file" / "cache")
    assert list(found.problems) == ["val-000001.tar"]
    assert found.cache_note and "cannot remember verified shards" in found.cache_note


def test_missing_or_resized_shards_are_left_to_the_loaders_start(data, tmp_path):
    (data / "train-000003.tar").write_bytes(b"short")
    (data / "val-000000.tar").unlink()
    found = check(data, tmp_path / "cache")
    assert found.problems == {} and found.shards_read == 5


def run_check_shards(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/check_shards.py"), *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_check_shards_names_each_bad_shard_in_one_line_and_exits_1(data, tmp_path):
    env_cache = os.environ["VIT_FAST_SHARD_CACHE"]
    ok = run_check_shards("--data_path", str(data), "--split", "val")
    assert ok.returncode == 0 and ok.stdout.startswith("shard contents: 2 shard(s) read"), ok
    flip_a_byte(data / "train-000004.tar", at=900)
    (data / "train-000000.tar").write_bytes(b"x")
    bad = run_check_shards("--data_path", str(data))
    lines = bad.stdout.splitlines()
    assert bad.returncode == 1, bad
    assert lines[0] == f"{data / 'train-000000.tar'}: missing, or not of the manifest's size"
    assert lines[1].startswith(f"{data / 'train-000004.tar'}: its sha256 is ")
    assert lines[2].startswith("shard contents: 4 shard(s) read") and ", 2 verified before" in lines[2]
    assert re.search(r" s, \d+ MB/s, \d+\.\d\d s of CPU\), ", lines[2]), lines[2]  # the cost, wall and CPU
    assert Path(env_cache).is_dir()
    again = run_check_shards("--data_path", str(data), "--split", "val", "--fresh")
    assert again.returncode == 0 and again.stdout.startswith("shard contents: 2 shard(s) read")
    missing = run_check_shards("--data_path", str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "check_shards: error: " in missing.stderr


def test_labels_beyond_a_class_list_edited_together_with_its_manifest_are_found(data, tmp_path):
    """manifest.json and classes.json cut to 2 classes together: the two agree, every shard is the manifest's, and
    only the labels (0-3) tell that this class list is not the shards'. A copy checked against 4 classes is checked
    again against 2."""
    assert run_check_shards("--data_path", str(data)).returncode == 0
    classes = json.loads((data / "classes.json").read_text())
    (data / "classes.json").write_text(json.dumps(classes[:2]))
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "num_classes": 2}))
    bad = run_check_shards("--data_path", str(data))
    lines = bad.stdout.splitlines()
    assert bad.returncode == 1 and lines[-1].startswith("shard contents: 7 shard(s) read"), bad
    assert len(lines) > 1 and all(" has label " in line and "but the set has 2 classes (manifest.json and "
                                  "classes.json)" in line for line in lines[:-1]), lines


def test_check_shards_refuses_a_class_count_that_is_not_the_class_lists(data):
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "num_classes": 10}))
    proc = run_check_shards("--data_path", str(data))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc
    assert f"{data / 'manifest.json'}: num_classes is 10, but {data / 'classes.json'} lists 4 classes" in proc.stderr


def _header(listed: list, n: int) -> int:
    """Where member n's header starts."""
    return listed[n][1] - 512


def _changed(blob: bytes, at: int, value: bytes) -> bytes:
    return blob[:at] + value + blob[at + len(value):]


def _renamed(blob: bytes, at: int) -> bytes:
    """The header at `at` with another name and a checksum that fits it: a valid header tarfile reads."""
    import tarfile

    head = _changed(blob[at:at + 512], 0, b"X")
    head = _changed(head, 148, b"%06o\0 " % tarfile.calc_chksums(head)[0])
    return blob[:at] + head + blob[at + 512:]


def test_the_header_walk_vouches_only_for_what_tarfile_lists(data, tmp_path):
    """`contents.tar_lists` walks the writer's headers by the index's offsets instead of tarfile's per-member objects
    (~20 us a member, 30x the hashing at small images); it may say True only where tarfile lists exactly the index's
    members, and where it cannot tell, tarfile decides, so every check stays what tarfile's reading made it."""
    import io
    import tarfile  # this file's other tests need neither

    blob = (data / "train-000000.tar").read_bytes()
    index = read_index(data / "train-000000.idx")
    listed = contents.listed_members(index)
    assert contents.tar_members(blob) == listed and contents.tar_lists(blob, listed)
    h1, last = _header(listed, 1), listed[-1][1] + listed[-1][2]
    cases = {
        "a name": (_changed(blob, h1, b"X"), listed),
        "a valid header of another name": (_renamed(blob, h1), listed),
        "a size": (_changed(blob, h1 + 124 + 10, b"7"), listed),
        "a checksum": (_changed(blob, h1 + 148 + 5, b"7" if blob[h1 + 153] != ord("7") else b"6"), listed),
        "a uid": (_changed(blob, h1 + 108 + 6, b"1"), listed),
        "a type": (_changed(blob, h1 + 156, b"5"), listed),
        "no end block": (blob[:last], listed),
        "a garbage end block": (_changed(blob, -(-last // 512) * 512, b"\x01"), listed),
        "an index without its last member": (blob, listed[:-1]),
        "an index with two members swapped": (blob, [listed[1], listed[0], *listed[2:]]),
    }
    for what, (tar, members) in cases.items():
        try:
            read = contents.tar_members(tar)
        except tarfile.TarError:
            read = None
        assert not contents.tar_lists(tar, members) or read == members, what
    renamed = _renamed(blob, h1)
    assert contents.tar_members(renamed)[1][0] == "X" + listed[1][0][1:]  # tarfile reads it: a mismatch is named
    assert "member 1 of the tar is X" in contents.members_mismatch(renamed, index)
    # A tar of another writer that tarfile reads (PAX headers, names past ustar's 100 bytes): tarfile decides.
    other, members = io.BytesIO(), []
    with tarfile.open(fileobj=other, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key in ("k" * 120, "short"):
            for ext, data_bytes in (("jpg", b"\xff\xd8" + bytes(700)), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data_bytes)
                tar.addfile(info, io.BytesIO(data_bytes))
    pax = other.getvalue()
    members = contents.tar_members(pax)
    pax_index = [(name.rsplit(".", 1)[0], {}) for name, _, _ in members[::2]]
    for (name, offset, size), (_, parts) in zip(members, [e for e in pax_index for _ in (0, 1)]):
        parts[name.rsplit(".", 1)[1]] = (offset, size)
    assert not contents.tar_lists(pax, contents.listed_members(pax_index))
    assert contents.members_mismatch(pax, pax_index) is None
    assert contents.members_mismatch(blob, index) is None
    assert "member 0 of the tar is" in contents.members_mismatch(blob, index[1:])
