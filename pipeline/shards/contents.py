"""Shard contents checked before training: each shard's bytes hashed against the manifest's sha256, its `.idx`
compared with the tar's own members, and its labels with the set's class count, once per copy of the files.

What the loaders check at every start (sizes, the index's own consistency) cannot see a shard swapped for another of
the same size, an index that pairs one sample's image with another's label, or a manifest whose sha256 is wrong. This
check can, at the price of reading every byte once. It is paid once per copy: a check that passes leaves a marker in
a cache folder, named by the copy's identity (the tar's and the index's location, size and version, where the version
is a local file's inode and ctime or an S3 object's ETag, and the sha256 and class count the manifest gives). A
marker is only ever found again for the same files unchanged: any write, copy, `touch` or rename over them makes
another identity, which is checked anew. Markers are empty files, so the ranks of a machine write them without
locks, and a cache on a home folder that several nodes share is shared correctly (another node's own copy of a shard
has another identity).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.shards import storage
from pipeline.shards.errors import ShardError
from pipeline.shards.format import LABEL, MEMBERS, Manifest, ShardInfo, decode_label, member_name, read_index

CACHE_ENV = "VIT_FAST_SHARD_CACHE"  # overrides the cache folder
THREADS = 2  # shards read and hashed at once per process (hashlib and file reads release the GIL)
BLOCK = tarfile.BLOCKSIZE
END_BLOCK = bytes(BLOCK)  # what ends a tar's members (tarfile stops at the first all-zero header block)
_thread = threading.local()  # each checking thread's read buffer, reused from shard to shard


def default_cache() -> Path:
    """$VIT_FAST_SHARD_CACHE, else the XDG cache folder's vit-fast/verified-shards (~/.cache by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vit-fast" / "verified-shards"


@dataclass
class Checked:
    """What a check found: per shard name, why its contents are not the manifest's; and what it cost."""

    problems: dict[str, str] = field(default_factory=dict)
    shards_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's, all its threads: what the check costs on a machine shared with others
    already_verified: int = 0
    cache_note: str | None = None  # why markers could not be written (the check itself ran)

    def merge(self, other: "Checked") -> None:
        self.problems.update(other.problems)
        self.shards_read += other.shards_read
        self.bytes_read += other.bytes_read
        self.seconds = max(self.seconds, other.seconds)  # parts run side by side
        self.cpu_seconds += other.cpu_seconds
        self.already_verified += other.already_verified
        self.cache_note = self.cache_note or other.cache_note

    def lines(self) -> list[str]:
        """What a run prints: the cost, and each shard that differs (under --on-error skip: skipped)."""
        rate = (f", {self.bytes_read / self.seconds / 1e6:.0f} MB/s, {self.cpu_seconds:.2f} s of CPU"
                if self.seconds > 0 and self.bytes_read else "")
        out = [f"shard contents: {self.shards_read} shard(s) read and hashed ({self.bytes_read / 1e6:.1f} MB in "
               f"{self.seconds:.1f} s{rate}), {self.already_verified} verified before"]
        out += [f"shard contents: {name}: {problem}; its samples are skipped" for name, problem in
                sorted(self.problems.items())]
        return out + ([self.cache_note] if self.cache_note else [])


def tar_members(blob: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member, in tar order: tarfile's own reading, apart from the index."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar]


def listed_members(index: list) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member the index lists, in its order (each sample's in the writer's)."""
    return [(member_name(key, m), *parts[m]) for key, parts in index for m in MEMBERS if m in parts]


def tar_lists(blob: bytes, listed: list[tuple[str, int, int]]) -> bool:
    """True when tarfile would read exactly `listed` from `blob` (`tar_members(blob) == listed`); False when it
    would not, or when this walk cannot tell: then ask tarfile.

    tarfile builds an object per member in Python, ~20 us each: 30x the hashing of a 1.3 KB member, so a set of
    small images was checked at a small share of the hashing rate. This walk visits the headers where the index
    says they are: each must hold the listed name and size, with a valid checksum, and the next must follow its
    data, up to the end-of-archive block. Only the first header is parsed by tarfile; every other must have the
    first's bytes outside name, size and checksum (as the writer's fixed fields give), so tarfile would read each the
    same way. Anything else (extended or prefixed names, other field values) is left to tarfile."""
    if not listed:
        return False
    try:
        first = tarfile.TarInfo.frombuf(blob[:BLOCK], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    if first.type != tarfile.REGTYPE or first.name != tarfile.nts(blob[:100], tarfile.ENCODING, "surrogateescape"):
        return False  # a pax or GNU header, or a ustar name prefix: only tarfile reads those
    ids, mtime, rest = blob[100:124], blob[136:148], blob[156:BLOCK]  # mode, uid, gid; mtime; type to the end
    # A header's checksum sums its bytes, its own 8 counted as spaces. Only the name and size fields vary, so the
    # rest is summed once; a name field's trailing NULs add nothing (a Python sum costs ~8 ns a byte).
    fixed_sum = 8 * ord(" ") + sum(ids) + sum(mtime) + sum(rest)
    pos = 0
    for name, offset, size in listed:
        name_field, size_field = blob[pos:pos + 100].rstrip(b"\0"), blob[pos + 124:pos + 136]
        if (offset != pos + BLOCK or not blob.startswith(rest, pos + 156) or not blob.startswith(mtime, pos + 136)
                or not blob.startswith(ids, pos + 100)
                or name_field.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape") != name):
            return False
        try:  # tarfile's numbers: octal up to the first NUL (int() takes the same text as tarfile's int())
            if (int(size_field.split(b"\0", 1)[0] or b"0", 8) != size
                    or int(blob[pos + 148:pos + 156].split(b"\0", 1)[0] or b"0", 8)
                    != fixed_sum + sum(name_field) + sum(size_field)):
                return False
        except ValueError:
            return False
        pos = offset + -(-size // BLOCK) * BLOCK
    return blob[pos:pos + BLOCK] == END_BLOCK


def members_mismatch(blob: bytes, index: list) -> str | None:
    """`index_mismatch(index, tar_members(blob))`, read by `tar_lists` where it can tell (a tar of the writer's),
    else by tarfile (whose TarError passes through)."""
    if tar_lists(blob, listed_members(index)):
        return None
    return index_mismatch(index, tar_members(blob))


def index_mismatch(index: list, members: list[tuple[str, int, int]]) -> str | None:
    """Where the index's entries and the tar's members part (the first member that differs), else None."""
    listed = listed_members(index)
    if listed == members:
        return None
    at = next((i for i, (a, b) in enumerate(zip(listed, members)) if a != b), min(len(listed), len(members)))
    says = "nothing" if at >= len(listed) else f"{listed[at][0]} at bytes {listed[at][1]}+{listed[at][2]}"
    holds = "nothing" if at >= len(members) else f"{members[at][0]} at bytes {members[at][1]}+{members[at][2]}"
    return f"member {at} of the tar is {holds}, the index says {says}"


def read_whole(location: str) -> bytes | bytearray:
    """The whole shard: an S3 object as bytes, a local file into this thread's buffer, resized to the file. A fresh
    ~100 MB object per shard costs about as much CPU (page faults) as hashing it; a resize within the buffer's
    allocation moves nothing."""
    if storage.is_s3(location):
        return storage.read_bytes(location)
    buffer = _thread.__dict__.setdefault("buffer", bytearray())
    with open(location, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if len(buffer) > size:
            del buffer[size:]
        else:
            buffer.extend(bytes(size - len(buffer)))
        done = 0
        with memoryview(buffer) as view:  # released before the next resize
            while done < size and (n := f.readinto(view[done:])):
                done += n
    del buffer[done:]  # a file that shrank while it was read: what there was
    return buffer


def shard_problem(location: str, index_location: str, shard: ShardInfo, num_classes: int | None = None) -> str | None:
    """Why this shard's contents are not the manifest's (sha256, an index that does not list the tar's members, or,
    given `num_classes`, a label that is no class of the set), else None."""
    try:
        blob = read_whole(location)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    digest = hashlib.sha256(blob).hexdigest()
    if len(blob) != shard.bytes or digest != shard.sha256:
        return (f"its sha256 is {digest[:16]}..., the manifest says {shard.sha256[:16]}...: not the shard this set "
                f"was made with (replaced, changed, or a manifest edited); restore it or remake the set")
    try:
        index = read_index(index_location, shard.num_samples, shard.bytes)
        mismatch = members_mismatch(blob, index)
    except (OSError, tarfile.TarError) as e:
        return f"cannot be listed ({e})"
    except ShardError as e:
        return str(e)
    if mismatch is not None:
        return f"{shard.index} does not list its members: {mismatch}; remake the set"
    return None if num_classes is None else label_problem(blob, index, num_classes)


def label_problem(blob: bytes, index: list, num_classes: int) -> str | None:
    """The first sample whose `.cls` is no label of the set's `num_classes` (manifest.json, classes.json), else None.
    A set whose manifest and class list were edited together, or put beside shards of another set, passes every
    other check and would train on labels the head does not have."""
    for key, parts in index:
        if LABEL in parts:
            offset, size = parts[LABEL]
            try:
                label = decode_label(blob[offset:offset + size])
            except ValueError:
                text = bytes(blob[offset:offset + min(size, 20)])
                return f"sample {key}: its label {text!r} is not a number; remake the set"
            if not 0 <= label < num_classes:
                return (f"sample {key} has label {label}, but the set has {num_classes} classes (manifest.json and "
                        f"classes.json): its labels are not this class list's; remake the set")
    return None


def identity(data_path: str, shard: ShardInfo, stats: dict[str, tuple[int, str]], num_classes: int) -> str:
    """The copy's files and what they were checked against: the sha256 and the class count (the labels' check)."""
    where = str(data_path) if storage.is_s3(data_path) else str(Path(data_path).resolve())
    tar, idx = stats[shard.name], stats[shard.index]
    text = "\n".join([where, shard.name, *map(str, tar), shard.index, *map(str, idx), shard.sha256,
                      f"num_classes {num_classes}"])
    return hashlib.sha256(text.encode()).hexdigest()


def check(data_path: str, manifest: Manifest, splits: list[str], part: tuple[int, int] = (0, 1),
          cache: Path | None = None, progress: bool = False, fresh: bool = False, threads: int = THREADS) -> Checked:
    """Check part `part` = (i, n) of the shards of `splits` (every n-th, from the i-th, in manifest order) that the
    cache does not know (`fresh`: all of them); `cache` None: the default folder. A shard that is missing or of
    another size is left to the loader's start, which names it."""
    cache = default_cache() if cache is None else Path(cache)
    stats = storage.file_stats(data_path)
    shards = [s for split in splits if split in manifest.splits for s in manifest.splits[split].shards]
    found, todo = Checked(), []
    for shard in shards[part[0]::part[1]]:
        if shard.name not in stats or shard.index not in stats or stats[shard.name][0] != shard.bytes:
            continue
        marker = cache / identity(data_path, shard, stats, manifest.num_classes)
        if marker.exists() and not fresh:
            found.already_verified += 1
        else:
            todo.append((shard, marker))
    start, cpu = time.perf_counter(), time.process_time()

    def one(job):
        shard, marker = job
        return shard, marker, shard_problem(storage.join(data_path, shard.name), storage.join(data_path, shard.index),
                                            shard, manifest.num_classes)

    bar = tqdm(total=sum(s.bytes for s, _ in todo), desc="checking shard contents", unit="B", unit_scale=True,
               disable=None if progress and todo else True)
    with bar, ThreadPoolExecutor(threads) as pool:
        for shard, marker, problem in pool.map(one, todo):
            bar.update(shard.bytes)
            found.shards_read += 1
            found.bytes_read += shard.bytes
            if problem is not None:
                found.problems[shard.name] = problem
            elif found.cache_note is None:
                found.cache_note = _remember(marker, shard.name)
    found.seconds, found.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return found


def _remember(marker: Path, name: str) -> str | None:
    """Writes the marker; why it could not be (the cache is then not used), else None."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(name + "\n")
    except OSError as e:
        return f"{marker.parent}: cannot remember verified shards ({e.strerror or e}); each start checks them again"
    return None
