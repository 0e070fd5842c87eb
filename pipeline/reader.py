"""The one reader: encoded samples (JPEG bytes + label) out of the shards, by (shard, sample index), through the
`.idx` offsets. Both backends read through it, in the order `pipeline/plan.py` decides: the host workers before
decoding with Pillow, DALI's external source before decoding on the GPU (or DALI's CPU operators).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

from pipeline.format import Shard, ShardError, read_index


class SampleError(ShardError):
    """One sample that cannot be used; the message names the shard file and the sample key."""


@dataclass
class Sample:
    shard: str
    key: str
    jpg: bytes
    cls: bytes
    problem: str | None = None  # why the bytes cannot be trusted (a shard cut short), reported when the sample is used

    @property
    def nbytes(self) -> int:
        return len(self.jpg) + len(self.cls)


def parse_label(sample: Sample, num_classes: int | None) -> int:
    """The `.cls` member as a class index; SampleError naming shard and key when it is not one (say, a shard cut short
    inside that member)."""
    if sample.problem:
        raise SampleError(f"{sample.shard}: sample {sample.key}: {sample.problem}")
    try:
        label = int(sample.cls.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError(f"{sample.shard}: sample {sample.key}: .cls is not a decimal label ({sample.cls[:20]!r})") \
            from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SampleError(f"{sample.shard}: sample {sample.key}: label {label} outside [0, {num_classes})")
    return label


class ShardReader:
    """Reads samples by reference. Keeps the last few shards' parsed indexes: a batch's samples come from a window of a
    few shards (plan rule 4), and parsing an index per sample would cost more than the read. Picklable without its
    cache, so a process pool can take a copy."""

    def __init__(self, cached_indexes: int = 8):
        self.cached_indexes = cached_indexes
        self._indexes: OrderedDict[str, list] = OrderedDict()

    def __getstate__(self):
        return {"cached_indexes": self.cached_indexes}

    def __setstate__(self, state):
        self.__init__(state["cached_indexes"])

    def index(self, shard: Shard) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        entries = self._indexes.pop(shard.index_path, None)
        if entries is None:
            entries = read_index(shard.index_path, shard.num_samples)
        self._indexes[shard.index_path] = entries
        while len(self._indexes) > self.cached_indexes:
            self._indexes.popitem(last=False)
        return entries

    def read(self, refs: list[tuple[Shard, int]]) -> list[Sample]:
        """The samples `refs` names, in that order; each shard is opened once and read in offset order."""
        out: list[Sample | None] = [None] * len(refs)
        by_shard: dict[Shard, list[int]] = {}
        for i, (shard, _) in enumerate(refs):
            by_shard.setdefault(shard, []).append(i)
        for shard, positions in by_shard.items():
            entries = self.index(shard)
            try:
                with open(shard.path, "rb") as f:
                    for i in sorted(positions, key=lambda i: refs[i][1]):
                        out[i] = self._read_one(f, shard, entries[refs[i][1]])
            except OSError as e:
                raise ShardError(f"{shard.path}: unreadable shard ({e.strerror or e})") from e
        return out

    def read_all(self, shard: Shard, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        """Samples [start, stop) of one shard, in order."""
        entries = self.index(shard)[start:stop]
        with open(shard.path, "rb") as f:
            for entry in entries:
                yield self._read_one(f, shard, entry)

    @staticmethod
    def _read_one(f, shard: Shard, entry) -> Sample:
        key, parts = entry
        data, problem = {}, None
        for ext in ("jpg", "cls"):
            if ext in parts:
                offset, size = parts[ext]
                f.seek(offset)
                data[ext] = f.read(size)
                if len(data[ext]) < size and problem is None:
                    problem = (f"the shard is cut short: its .{ext} needs bytes {offset}-{offset + size} of the file, "
                               f"which ends at {offset + len(data[ext])} (remake the shards)")
        return Sample(shard.path, key, data.get("jpg", b""), data.get("cls", b""), problem)
