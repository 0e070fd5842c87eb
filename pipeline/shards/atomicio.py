"""Atomic file writes: write under a temporary name in the same folder, then `os.replace`.

A crash or Ctrl-C never leaves a half-written file under a final name. Temporary names share one
pattern (`.<final name>.<pid>.tmp`) so a later run can find and remove leftovers.
"""
import json
import os
import re
from pathlib import Path

TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\..+\.\d+\.tmp$")


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under before being renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    return bool(_TEMP_RE.match(name))


def remove_temp_files(folder: Path) -> list:
    """Delete leftover temporary files (ours only, by name pattern) directly inside `folder`."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        if entry.is_file() and is_temp_name(entry.name):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def fsync_file(path: Path) -> None:
    """A file's bytes, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fsync_file(folder)  # the rename itself lives in the directory entry; syncing the folder makes it durable


def finish_temp(tmp: Path, path: Path, fsync: bool = True) -> None:
    """Rename a fully written temporary file into place. With `fsync`, its bytes reach the disk before its name does
    (else a power loss can leave an empty file under the final name), and the rename after them."""
    if fsync:
        fsync_file(tmp)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(Path(path).parent)


def write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` atomically; on any error the temporary file is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        finish_temp(tmp, path, fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, fsync: bool = True) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode(), fsync)
