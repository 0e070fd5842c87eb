"""pipeline/shards/atomicio.py: a file's bytes reach the disk before its final name does, for every durable write
(checkpoints, indexes, manifests); a failed write leaves no temporary file."""
import os

import pytest
import torch

from pipeline.shards import atomicio
from trainlib import checkpoint


@pytest.fixture
def syncs(monkeypatch):
    """What was fsync'd, in order: ("file", inode) or ("dir", path), and ("rename", inode of the file renamed)."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("dir", None) if os.path.stat.S_ISDIR(st.st_mode) else ("file", st.st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _synced_before_renamed(events) -> bool:
    renames = [(i, ino) for i, (kind, ino) in enumerate(events) if kind == "rename"]
    return bool(renames) and all(("file", ino) in events[:i] and ("dir", None) in events[i:] for i, ino in renames)


def test_write_bytes_syncs_the_file_then_the_rename(tmp_path, syncs):
    atomicio.write_bytes(tmp_path / "manifest.json", b"{}")
    assert (tmp_path / "manifest.json").read_bytes() == b"{}"
    assert _synced_before_renamed(syncs)


def test_a_checkpoint_is_on_disk_before_its_name(tmp_path, syncs):
    checkpoint.save(tmp_path / "last.pth", {"model": {"w": torch.ones(3)}, "global_step": 7})
    assert checkpoint.load(tmp_path / "last.pth")["global_step"] == 7
    assert _synced_before_renamed(syncs)


def test_an_unsynced_write_is_still_atomic_and_a_failed_one_leaves_nothing(tmp_path, syncs, monkeypatch):
    atomicio.write_bytes(tmp_path / "rec.json", b"1", fsync=False)
    assert (tmp_path / "rec.json").read_bytes() == b"1" and not [e for e in syncs if e[0] != "rename"]

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        atomicio.write_bytes(tmp_path / "rec.json", b"2")
    assert [p.name for p in tmp_path.iterdir()] == ["rec.json"] and (tmp_path / "rec.json").read_bytes() == b"1"
