"""The one reader: encoded samples (JPEG bytes + label) out of the shards, by (shard, sample index), through the
`.idx` offsets. Both backends read through it, in the order `pipeline/plan.py` decides: the host workers before
decoding with Pillow, DALI's external source before decoding on the GPU (or DALI's CPU operators).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pipeline.shards import storage
from pipeline.shards.errors import SampleError, ShardError
from pipeline.shards.format import IMAGE, LABEL, MEMBERS, Shard, decode_label, read_index


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


def usable_label(sample: Sample, num_classes: int | None) -> int:
    """The `.cls` member as a class index, once the sample is known to be usable by a decoder; SampleError naming
    shard and key when it is not (a shard cut short, no `.jpg`, a `.cls` that is no label in range)."""
    if sample.problem:
        raise SampleError(f"{sample.shard}: sample {sample.key}: {sample.problem}")
    if not sample.jpg:
        raise SampleError(f"{sample.shard}: sample {sample.key}: no .jpg component")
    try:
        label = decode_label(sample.cls)
    except ValueError:
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
            entries = read_index(shard.index_path, shard.num_samples, shard.bytes)
        self._indexes[shard.index_path] = entries
        while len(self._indexes) > self.cached_indexes:
            self._indexes.popitem(last=False)
        return entries

    def read(self, refs: list[tuple[Shard, int]]) -> list[Sample]:
        """The samples `refs` names, in that order. Per shard, one request covers each sample's members (a local
        file: seek and read; S3: ranged GETs, near ones merged, several in flight)."""
        out: list[Sample | None] = [None] * len(refs)
        by_shard: dict[Shard, list[int]] = {}
        for i, (shard, _) in enumerate(refs):
            by_shard.setdefault(shard, []).append(i)
        for shard, positions in by_shard.items():
            if shard.problem:  # not the manifest's shard: nothing of it is read, each sample says why
                for i in positions:
                    out[i] = Sample(shard.path, f"#{refs[i][1]}", b"", b"", shard.problem)
                continue
            entries = self.index(shard)
            for i, sample in zip(positions, self._read_entries(shard, [entries[refs[i][1]] for i in positions])):
                out[i] = sample
        return out

    def read_batch(self, planner, epoch: int, index: int) -> list[Sample | None]:
        """The encoded samples of batch `index` of `epoch` by the plan (`EpochPlanner.batch`), None for padding: what
        both decoders start from."""
        refs = planner.batch(epoch, index)
        real = iter(self.read([r for r in refs if r is not None]))
        return [next(real) if r is not None else None for r in refs]

    def read_all(self, shard: Shard, start: int = 0, stop: int | None = None) -> list[Sample]:
        """Samples [start, stop) of one shard, in order."""
        return self._read_entries(shard, self.index(shard)[start:stop])

    @staticmethod
    def _read_entries(shard: Shard, entries: list) -> list[Sample]:
        spans = [(min(o for o, _ in parts.values()), max(o + n for o, n in parts.values())) for _, parts in entries]
        try:
            blobs = storage.read_ranges(shard.path, spans)
        except OSError as e:
            raise ShardError(f"{shard.path}: unreadable shard ({e.strerror or e})") from e
        return [_sample(shard, entry, span[0], blob) for entry, span, blob in zip(entries, spans, blobs)]


def samples_in(shard: Shard, entries: list, data: bytes) -> list[Sample]:
    """The samples `entries` (index entries of `shard`) name, cut out of `data`, the whole file's bytes: for the
    verifier, which holds them already to hash them."""
    return [_sample(shard, entry, 0, data) for entry in entries]


def _sample(shard: Shard, entry, start: int, blob: bytes) -> Sample:
    """The sample's members cut out of `blob` (the file's bytes from `start`); a member the blob does not fully hold
    means the file is shorter than its index says."""
    key, parts = entry
    data, problem = {}, None
    for ext in MEMBERS:
        if ext in parts:
            offset, size = parts[ext]
            data[ext] = blob[offset - start:offset - start + size]
            if len(data[ext]) < size and problem is None:
                problem = (f"the shard is cut short: its .{ext} needs bytes {offset}-{offset + size} of the file, "
                           f"which ends at {start + len(blob)} (remake the shards)")
    return Sample(shard.path, key, data.get(IMAGE, b""), data.get(LABEL, b""), problem)
