"""One run per run folder: rank 0 of a train.py run holds an advisory lock on --output from its start to its end.

The lock is `flock` on <output>/train.lock, whose one line names the holder: `pid 1234 on host h (started
2026-12-06 09:10:00)` (pipeline/shards/folderlock.py, the lock make_shards takes on its --out). A second run on the
folder is refused in one line naming it (exit status 2). The kernel drops a flock when its holder dies, kill -9
included, so a lock file whose flock can be taken is stale: the next run takes it over and says whose it was. A run
that ends removes the file, and the folders it made if nothing else was written into them, so a start that fails
leaves no run folder (other files in the folder, such as a launch script's train.log, are no concern of the lock).
Other ranks get a `NoLock`."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.shards import folderlock
from trainlib.config import ConfigError

LOCK = "train.lock"


class RunFolderInUse(ConfigError):
    """A live run holds the folder: a usage error (exit status 2), as a wrong --output is."""


class RunLock:
    """The lock on `output`, taken on construction (RunFolderInUse if another run holds it); `release()` at the end.
    `stale_holder`: the holder named by a lock file that a dead process left, taken over; None otherwise."""

    def __init__(self, output: str | Path):
        self.shown, self.output = str(output), Path(output)
        self.path = self.output / LOCK
        self.stale_holder: str | None = None
        self._made = _missing_folders(self.output)  # deepest first: what release() may remove again
        self._fd: int | None = None
        self._take()

    def _take(self) -> None:
        for _ in range(100):  # a retry per race lost to a run that ended just then: a few at most
            try:
                self.output.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--output {self.shown}: cannot make the run folder ({e.strerror})") from None
            try:
                fd, before = folderlock.take(self.path)
            except folderlock.Held as e:
                raise RunFolderInUse(f"--output {self.shown} is in use by "
                                     f"{e.holder or 'another run (it has not written its name yet)'}; wait for it, or "
                                     f"give another --output") from None
            except FileNotFoundError:
                continue  # the folder went between the two calls (a run that ended removed it): make it again
            except OSError as e:  # a file system without flock (ENOLCK, EOPNOTSUPP), or one we may not write
                self._remove_made(self.path)  # a failed start leaves no run folder
                raise ConfigError(f"--output {self.shown}: cannot lock {self.path} ({e.strerror}): put the run "
                                  f"folder on a file system with flock") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed the file between our open and our flock: lock the file there now
        else:
            raise ConfigError(f"--output {self.shown}: could not lock {self.path} (it keeps disappearing)")
        # A line in a file we could lock was left by a holder that died (one that ends removes the file).
        self.stale_holder = before or None
        self._fd = fd

    def notes(self) -> list[str]:
        """The line saying a stale lock was taken over, if one was."""
        if self.stale_holder is None:
            return []
        return [f"note: took over the lock of --output {self.shown} from {self.stale_holder}, which is no longer "
                f"running (killed?)"]

    def release(self) -> None:
        """Remove the lock file while still holding it (a run that opened it meanwhile finds its flock on a file no
        longer in the folder and opens the new one), drop the lock, then the folders it made if they hold nothing
        else. Idempotent."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink()
        os.close(self._fd)  # the flock goes with the last descriptor of the file
        self._fd = None
        self._remove_made()

    def _remove_made(self, lock_file: Path | None = None) -> None:
        """The folders this start made, deepest first, while they hold nothing else (`lock_file`, where it made one
        it could not lock, goes first)."""
        if lock_file is not None and self._made:
            lock_file.unlink(missing_ok=True)
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break  # files in it: a run's, or a run's that started meanwhile


class NoLock:
    """Ranks other than 0: they write nothing into the run folder, and so lock nothing."""

    stale_holder = None

    def notes(self) -> list[str]:
        return []

    def release(self) -> None:
        pass


def _missing_folders(folder: Path) -> list[Path]:
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
