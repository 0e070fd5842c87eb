"""Shard contents checked before training: each shard's bytes hashed against the manifest's sha256, and its `.idx`
compared with the tar's own members, once per copy of the files.

What the loaders check at every start (sizes, the index's own consistency) cannot see a shard swapped for another of
the same size, an index that pairs one sample's image with another's label, or a manifest whose sha256 is wrong. This
check can, at the price of reading every byte once. It is paid once per copy: a check that passes leaves a marker in
a cache folder, named by the copy's identity (the tar's and the index's location, size and version, where the version
is a local file's inode and ctime or an S3 object's ETag, and the sha256 the manifest expects). A marker is only ever
found again for the same files unchanged: any write, copy, `touch` or rename over them makes another identity, which
is checked anew. Markers are empty files, so the ranks of a machine write them without locks, and a cache on a home
folder that several nodes share is shared correctly (another node's own copy of a shard has another identity).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.shards import storage
from pipeline.shards.errors import ShardError
from pipeline.shards.format import MEMBERS, Manifest, ShardInfo, member_name, read_index

CACHE_ENV = "VIT_FAST_SHARD_CACHE"  # overrides the cache folder
THREADS = 2  # shards read and hashed at once per process (hashlib and file reads release the GIL)


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
    already_verified: int = 0
    cache_note: str | None = None  # why markers could not be written (the check itself ran)

    def merge(self, other: "Checked") -> None:
        self.problems.update(other.problems)
        self.shards_read += other.shards_read
        self.bytes_read += other.bytes_read
        self.seconds = max(self.seconds, other.seconds)  # parts run side by side
        self.already_verified += other.already_verified
        self.cache_note = self.cache_note or other.cache_note

    def lines(self) -> list[str]:
        """What a run prints: the cost, and each shard that differs (under --on-error skip: skipped)."""
        rate = f", {self.bytes_read / self.seconds / 1e6:.0f} MB/s" if self.seconds > 0 and self.bytes_read else ""
        out = [f"shard contents: {self.shards_read} shard(s) read and hashed ({self.bytes_read / 1e6:.1f} MB in "
               f"{self.seconds:.1f} s{rate}), {self.already_verified} verified before"]
        out += [f"shard contents: {name}: {problem}; its samples are skipped" for name, problem in
                sorted(self.problems.items())]
        return out + ([self.cache_note] if self.cache_note else [])


def tar_members(blob: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member, in tar order: tarfile's own reading, apart from the index."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar]


def index_mismatch(index: list, members: list[tuple[str, int, int]]) -> str | None:
    """Where the index's entries and the tar's members part (the first member that differs), else None."""
    listed = [(member_name(key, m), *parts[m]) for key, parts in index for m in MEMBERS if m in parts]
    if listed == members:
        return None
    at = next((i for i, (a, b) in enumerate(zip(listed, members)) if a != b), min(len(listed), len(members)))
    says = "nothing" if at >= len(listed) else f"{listed[at][0]} at bytes {listed[at][1]}+{listed[at][2]}"
    holds = "nothing" if at >= len(members) else f"{members[at][0]} at bytes {members[at][1]}+{members[at][2]}"
    return f"member {at} of the tar is {holds}, the index says {says}"


def shard_problem(location: str, index_location: str, shard: ShardInfo) -> str | None:
    """Why this shard's contents are not the manifest's (sha256, or an index that does not list the tar's members),
    else None."""
    try:
        blob = storage.read_bytes(location)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    digest = hashlib.sha256(blob).hexdigest()
    if len(blob) != shard.bytes or digest != shard.sha256:
        return (f"its sha256 is {digest[:16]}..., the manifest says {shard.sha256[:16]}...: not the shard this set "
                f"was made with (replaced, changed, or a manifest edited); restore it or remake the set")
    try:
        index = read_index(index_location, shard.num_samples, shard.bytes)
        mismatch = index_mismatch(index, tar_members(blob))
    except (OSError, tarfile.TarError) as e:
        return f"cannot be listed ({e})"
    except ShardError as e:
        return str(e)
    return None if mismatch is None else f"{shard.index} does not list its members: {mismatch}; remake the set"


def identity(data_path: str, shard: ShardInfo, stats: dict[str, tuple[int, str]]) -> str:
    where = str(data_path) if storage.is_s3(data_path) else str(Path(data_path).resolve())
    tar, idx = stats[shard.name], stats[shard.index]
    text = "\n".join([where, shard.name, *map(str, tar), shard.index, *map(str, idx), shard.sha256])
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
        marker = cache / identity(data_path, shard, stats)
        if marker.exists() and not fresh:
            found.already_verified += 1
        else:
            todo.append((shard, marker))
    start = time.perf_counter()

    def one(job):
        shard, marker = job
        return shard, marker, shard_problem(storage.join(data_path, shard.name), storage.join(data_path, shard.index),
                                            shard)

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
    found.seconds = time.perf_counter() - start
    return found


def _remember(marker: Path, name: str) -> str | None:
    """Writes the marker; why it could not be (the cache is then not used), else None."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(name + "\n")
    except OSError as e:
        return f"{marker.parent}: cannot remember verified shards ({e.strerror or e}); each start checks them again"
    return None
