"""One process at a time in a folder: an exclusive `flock` on a file in it, whose one line names the holder (`pid N on
host H (started T)`). make_shards locks its --out with it (writer.py) and train.py its --output (trainlib/runlock.py).

The kernel drops a flock when its holder dies, kill -9 included, so a lock never outlives its process; a line found
in a file whose lock could be taken is the name of a holder that died (or of one that ended without removing it).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class Held(Exception):
    """A live process holds the lock; `holder` is the line it wrote ("" if it has not yet)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take(path: Path) -> tuple[int, str]:
    """Locks `path` (created if missing) without waiting: (its descriptor, whose closing releases the lock; the line
    that was in the file before, "" if none). Held when a live process has it; an OSError where the file system has
    no flock (ENOLCK, EOPNOTSUPP) or the file cannot be made. Our own line replaces the old one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read(fd)
        os.close(fd)
        raise Held(holder) from None
    except OSError:
        os.close(fd)
        raise
    before = read(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})"
                  f"\n".encode(), 0)
    return fd, before


def read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()
