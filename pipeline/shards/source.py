"""What `tools/make_shards.py` reads: what a scanned source is, and which shard each sample goes to.

Each kind of source has its module: an ImageFolder (`imagefolder.py`), the ILSVRC2012 download tars (`ilsvrc.py`),
webdataset tars (`wds.py`), Hugging Face parquet files (`parquet.py`); `detect.py` tells them apart. Each scans to
the same `Scan`: the class list and, per split, the candidate samples as `Entry`s sorted by class and name, plus a
picklable reader with which the writer's workers fetch an entry's bytes. The writer and `--verify` see only this
contract.
"""
from __future__ import annotations

import multiprocessing
import random
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipeline.shards.errors import UsageError
from pipeline.shards.format import FORMATS

SPLIT_TOKENS = {"train": "train", "val": "val", "validation": "val"}  # a file name's word -> our split


class Entry(NamedTuple):
    """One candidate sample."""

    path: str  # what messages and the manifest call it: a file under SRC, `a.tar/inner.tar/member`, `b.parquet[7]`
    label: int
    key: str
    loc: tuple | None = None  # where its reader finds the bytes; None: the file `path` under SRC


@dataclass
class SplitScan:
    name: str
    entries: list = field(default_factory=list)  # Entry per image candidate, sorted by class and name
    rejected: list = field(default_factory=list)  # {split, path, reason} of files rejected without reading them
    ignored: list = field(default_factory=list)  # hidden/system files, by name

    @property
    def num_files(self) -> int:
        return len(self.entries) + len(self.rejected) + len(self.ignored)


@dataclass
class Scan:
    classes: list
    splits: dict  # split name -> SplitScan
    fingerprint: str  # sha256 over the source's file names, sizes and times: another value is another plan
    reader: object  # `read_all(entries)` -> (entry, bytes or reason) pairs; sent to the workers
    window: int = 1  # shards a worker builds in one read of their sources (see plan_shards)


@dataclass(frozen=True)
class FileReader:
    """Reads entries that are files under `root` (an ImageFolder)."""

    root: Path

    def read_all(self, entries):
        for entry in entries:
            try:
                yield entry, (self.root / entry.path).read_bytes()
            except OSError as e:
                yield entry, f"cannot read: {e.strerror or e}"


def add_to_fingerprint(digest, rel: str, path: Path) -> None:
    """A source file's name, size and time, into the scan's fingerprint (`Scan.fingerprint`)."""
    try:
        st = path.stat()
        line = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
    except OSError:
        line = f"{rel}\0broken\n"
    digest.update(line.encode("utf-8", "surrogateescape"))  # file names need not be UTF-8


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent alone ends the pool


def worker_pool(processes: int):
    """The pool that lists and writes a source: its workers leave Ctrl-C to the parent."""
    return multiprocessing.Pool(processes, initializer=_ignore_sigint)


def split_of(relpath: str) -> str | None:
    """The split a tar or parquet file belongs to: the first of train, val, validation among the words of its path
    (`imagenet-train-000012.tar`, `data/validation-00000-of-00014.parquet`, `val/0001.tar`), else None."""
    for token in re.split(r"[-_./]", relpath.lower()):
        if token in SPLIT_TOKENS:
            return SPLIT_TOKENS[token]
    return None


def by_split(files: list, what: str, where: Path) -> dict:
    """{split: files} by `split_of`; the files no split claims (a `test` split, say) are named in one line and not
    read; none claimed at all is a UsageError."""
    out, unclaimed = {}, []
    for rel in files:
        split = split_of(rel)
        (out.setdefault(split, []) if split else unclaimed).append(rel)
    if not out:
        raise UsageError(f"{where}: none of its {what} is named for train or val/validation (e.g. {unclaimed[0]}); "
                         f"name them so or put them in train/ and val/ folders")
    if unclaimed:
        more = f" and {len(unclaimed) - 1} more" if len(unclaimed) > 1 else ""
        print(f"make_shards: not read, their names say no train or val split: {unclaimed[0]}{more}", file=sys.stderr)
    return out


def plan_shards(split: SplitScan, seed: int, per_shard: int, window: int = 1) -> list:
    """Shard contents as lists of entries.

    window 1 (every source that reads any entry at the same cost): a seeded shuffle of the whole split, so every
    shard mixes classes. A larger window is for sources read in blocks (parquet row groups, `Entry.loc` =
    (file, block, row)): the blocks are shuffled, their rows run together and cut into windows of `window` shards,
    each window's rows shuffled among its shards, and each shard kept in reading order, so one pass over a window's
    blocks writes all its shards at once.
    """
    # A str seed is hashed with sha512 by `random`, so this is stable across runs and machines. Its salt is the
    # first format's name in every format: another salt would deal the same files to other shards.
    rng = random.Random(f"{FORMATS[0]}:{seed}:{split.name}")
    if window == 1:
        order = list(split.entries)
        rng.shuffle(order)
        return [order[i:i + per_shard] for i in range(0, len(order), per_shard)]
    blocks = {}
    for e in split.entries:
        blocks.setdefault(e.loc[:2], []).append(e)
    names = sorted(blocks)
    rng.shuffle(names)
    rows = [e for b in names for e in blocks[b]]
    shards, size = [], window * per_shard
    for w in range(0, len(rows), size):
        dealt = rows[w:w + size]
        rng.shuffle(dealt)
        shards += [sorted(dealt[i:i + per_shard], key=lambda e: e.loc) for i in range(0, len(dealt), per_shard)]
    return shards


def windows(num_shards: int, window: int) -> list[range]:
    """The shard numbers each worker job builds together."""
    return [range(i, min(i + window, num_shards)) for i in range(0, num_shards, window)]
