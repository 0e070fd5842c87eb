"""Which samples each rank and worker reads in an epoch: the one rule every backend shares.

The rule (DALI's reader splits ranks the same way, so both backends give a rank the same span; within it DALI's
shuffle picks which train samples sit out the epoch, the host backend leaves out the span's tail):
  1. An epoch's sample sequence is the split's shards, in an order permuted by (seed, epoch) for train and in
     manifest order for val, concatenated.
  2. Rank r of R owns the span [floor(N*r/R), floor(N*(r+1)/R)) of that sequence (N samples in the split).
  3. Train: every rank runs `steps = N // (R*B)` batches and reads the first steps*B samples of its span, so a sample
     is seen at most once per epoch and fewer than R*B samples (the spans' tails) sit out the epoch; which ones
     changes with the shard order. Val: every rank runs `ceil(ceil(N/R) / B)` batches; a rank's span is read whole
     and padded to that many batches with samples labelled -1, which metrics skip, so val counts each sample once.
  4. Within a rank, worker w of W produces a contiguous run of batches; the consumer takes batch i from worker
     i % W, so worker w owns batches w, w+W, w+2W, ... of the rank's sequence in time, read from one contiguous
     stretch of shards on disk.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class PipelineError(RuntimeError):
    """An input problem the user can fix (data on disk, machine resources); the message says what, in one line."""


class ShardError(PipelineError):
    """A shard set on disk that the pipeline cannot use; the message says which file and why."""


@dataclass(frozen=True)
class Shard:
    path: str  # the tar file
    index_path: str  # its DALI/wds2idx index: sample offsets, so a reader can seek instead of scanning
    num_samples: int


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, in the shard's own order."""

    shard: Shard
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch: `segments` hold `num_real` samples; `steps*batch_size - num_real` padding
    samples (label -1, val only) follow them."""

    segments: tuple[Segment, ...]
    steps: int
    batch_size: int
    num_real: int

    @property
    def num_padding(self) -> int:
        return self.steps * self.batch_size - self.num_real


def read_manifest(data_path: str | Path) -> dict:
    path = Path(data_path) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no shard manifest here; make shards with tools/make_shards.py first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from e
    if "splits" not in manifest:
        raise ShardError(f"{path}: not a manifest written by tools/make_shards.py (no 'splits')")
    return manifest


def shard_list(data_path: str | Path, split: str, manifest: dict | None = None) -> list[Shard]:
    """The split's shards in manifest order, checked to exist so a missing file fails here and not in a worker."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = manifest or read_manifest(data_path)
    entry = manifest["splits"].get(split)
    if not entry or not entry.get("shards"):
        raise ShardError(f"{Path(data_path) / MANIFEST}: no '{split}' shards in this data set")
    root = Path(data_path)
    shards = []
    for s in entry["shards"]:
        tar, idx = root / s["name"], root / s["index"]
        for f in (tar, idx):
            if not f.is_file():
                raise ShardError(f"{f}: listed in the manifest but missing; rerun tools/make_shards.py to complete it")
        shards.append(Shard(str(tar), str(idx), int(s["num_samples"])))
    return shards


def epoch_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    """Shard order for an epoch: the same on every rank (seeded by seed and epoch only), new each epoch."""
    if not shuffle:
        return list(shards)
    order = list(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def rank_span(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    # The same integer split as DALI's readers use for shard_id/num_shards.
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, train: bool) -> int:
    if train:
        return num_samples // (world_size * batch_size)
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def _segments(shards: list[Shard], start: int, stop: int) -> list[Segment]:
    """Cut samples [start, stop) of the concatenated shards into per-shard segments."""
    out, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.num_samples)
        if lo < hi:
            out.append(Segment(shard, lo - offset, hi - offset))
        offset += shard.num_samples
        if offset >= stop:
            break
    return out


def rank_plan(shards: list[Shard], *, train: bool, batch_size: int, rank: int, world_size: int, seed: int,
              epoch: int) -> RankPlan:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
    total = sum(s.num_samples for s in shards)
    steps = steps_per_epoch(total, batch_size, world_size, train)
    if train and steps == 0:
        raise ShardError(f"{total} train samples cannot fill one batch of {batch_size} on each of {world_size} "
                         f"ranks; lower --batch-size")
    lo, hi = rank_span(total, rank, world_size)
    if train:
        hi = lo + steps * batch_size  # the span's tail sits out this epoch
    ordered = epoch_order(shards, seed, epoch, shuffle=train)
    return RankPlan(tuple(_segments(ordered, lo, hi)), steps, batch_size, hi - lo)


def worker_batches(steps: int, worker: int, num_workers: int) -> range:
    """The rank-local batch indices worker `worker` produces, as one contiguous run (rule 4 above)."""
    base, extra = divmod(steps, num_workers)
    first = worker * base + min(worker, extra)
    return range(first, first + base + (worker < extra))


def consumer_order(steps: int, num_workers: int) -> list[tuple[int, int]]:
    """(worker, rank-local batch index) in the order the consumer yields them: round robin over workers, each
    worker's own batches in order. Consecutive batches thus come from different places on disk."""
    runs = [iter(worker_batches(steps, w, num_workers)) for w in range(num_workers)]
    out = []
    for i in range(steps):
        w = i % num_workers
        out.append((w, next(runs[w])))
    return out


def batch_segments(plan: RankPlan, batch_indices: range) -> tuple[list[Segment], int]:
    """Segments holding the rank-local batches `batch_indices` (contiguous), plus how many padding samples follow
    them (val only)."""
    if not len(batch_indices):
        return [], 0
    lo, hi = batch_indices[0] * plan.batch_size, (batch_indices[-1] + 1) * plan.batch_size
    real_hi = min(hi, plan.num_real)
    segs, offset = [], 0
    for seg in plan.segments:
        a, b = max(lo, offset), min(real_hi, offset + len(seg))
        if a < b:
            segs.append(Segment(seg.shard, seg.start + a - offset, seg.start + b - offset))
        offset += len(seg)
    return segs, hi - max(lo, real_hi)
