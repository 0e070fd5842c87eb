"""Members of tar files, nested ones included, found by their headers alone and read in place by byte offset.

The ILSVRC2012 downloads and existing webdataset sets are uncompressed tars: tarfile lists a member's data offset
without reading its data, and a tar inside a tar is a byte range of the outer file, so every image has an
(outer file, offset, size) and workers read it with one `pread`, never extracting anything to disk.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.shards.source import worker_pool


@dataclass
class Listing:
    """The file members of one tar (or of a byte range of one, for a nested tar)."""

    members: list = field(default_factory=list)  # (name, absolute data offset in the file, size)
    # Why the listing ended early, as (the member it ended at or None, reason): a tar cut short or a corrupt header.
    # The members before it stand.
    problem: tuple | None = None
    cut: tuple | None = None  # (name, offset, bytes there) of a member the file ends inside: what of it exists
    heads: dict = field(default_factory=dict)  # name -> first bytes, of the members named by `read_suffix`


class _Window(io.RawIOBase):
    """`size` bytes of an open file from `base` on, as a seekable file of its own (a tar inside a tar). tarfile's
    `extractfile` gives the same view, but only through a listing of the outer tar, which each worker would redo."""

    def __init__(self, f, base: int, size: int):
        super().__init__()
        self.f, self.base, self.size, self.pos = f, base, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: pos, io.SEEK_CUR: self.pos + pos, io.SEEK_END: self.size + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        data = os.pread(self.f.fileno(), max(0, n), self.base + self.pos)
        self.pos += len(data)
        return data


HEAD_BYTES = 64


def list_members(path: Path, base: int = 0, size: int | None = None, read_suffix: str | None = None) -> Listing:
    """Regular-file members of the tar at `path` (or at bytes [base, base + size) of it), in tar order, and the first
    `HEAD_BYTES` of those whose name ends in `read_suffix` (webdataset's tiny `.cls` labels: read while the tar is
    open in the listing worker, not one by one afterwards).

    A tar cut short keeps the members that end inside it; the first one that does not is left out and named in
    `problem`, as is a corrupt header (what comes after it cannot be found)."""
    out = Listing()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size - base if size is None else size
        try:
            tar = tarfile.open(fileobj=_Window(f, base, size), mode="r:")
        except tarfile.TarError as e:
            out.problem = (None, f"not a readable tar ({e})")
            return out
        with tar:
            while True:
                try:
                    m = tar.next()
                except tarfile.TarError as e:  # tarfile: "unexpected end of data" past a cut member, bad headers
                    out.problem = (None, f"tar cut short or corrupt after {len(out.members)} members ({e})")
                    break
                if m is None:  # tarfile also ends here at a cut or corrupt header; an intact tar has its zero block
                    end = os.pread(f.fileno(), tarfile.BLOCKSIZE, base + tar.offset) if tar.offset < size else b""
                    if end != bytes(tarfile.BLOCKSIZE):
                        out.problem = (None, f"tar cut short or corrupt after {len(out.members)} members (no "
                                             f"end-of-archive block at byte {tar.offset})")
                    break
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    out.problem = (m.name, f"tar cut short: the member needs bytes up to {m.offset_data + m.size}, "
                                           f"the tar has {size}")
                    out.cut = (m.name, base + m.offset_data, size - m.offset_data)
                    break
                out.members.append((m.name, base + m.offset_data, m.size))
                if read_suffix and m.name.lower().endswith(read_suffix):
                    out.heads[m.name] = os.pread(f.fileno(), min(m.size, HEAD_BYTES), base + m.offset_data)
    return out


def _list_job(job: tuple) -> Listing:
    return list_members(*job)


def list_many(jobs: list, workers: int, desc: str) -> list:
    """`list_members(*job)` for every (path[, base, size, read_suffix]) job, over `workers` processes, with a progress
    bar."""
    bar = dict(total=len(jobs), desc=desc, unit="tar", dynamic_ncols=True, disable=len(jobs) < 2)
    if workers == 1 or len(jobs) < 2:
        return [_list_job(j) for j in tqdm(jobs, **bar)]
    with worker_pool(min(workers, len(jobs))) as pool:
        return list(tqdm(pool.imap(_list_job, jobs, chunksize=4), **bar))


@dataclass(frozen=True)
class TarReader:
    """Reads entries whose `loc` is (file relative to root, offset, size): what the workers of a tar source use."""

    root: Path

    def read_all(self, entries):
        """(entry, bytes) for each entry, or (entry, reason) where it cannot be read."""
        files = {}
        try:
            for entry in entries:
                name, offset, size = entry.loc
                try:
                    if name not in files:
                        files[name] = os.open(self.root / name, os.O_RDONLY)
                    data = os.pread(files[name], size, offset)
                except OSError as e:
                    yield entry, f"cannot read: {e.strerror or e}"
                    continue
                yield entry, data if len(data) == size else f"cannot read: {name} ends inside this member"
        finally:
            for fd in files.values():
                os.close(fd)
