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

import math
import random
from dataclasses import dataclass

from pipeline.format import Shard, ShardError


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


@dataclass(frozen=True)
class EpochPlanner:
    """One rank's view of a split: its shards and the settings the rule depends on, so that every reader (the host
    loader, its workers, the DALI loader) asks for an epoch's plan the same way. Picklable: workers get a copy."""

    shards: tuple[Shard, ...]  # manifest order
    train: bool
    batch_size: int
    rank: int
    world_size: int
    seed: int

    def order(self, epoch: int) -> list[Shard]:
        return epoch_order(list(self.shards), self.seed, epoch, shuffle=self.train)

    def plan(self, epoch: int) -> RankPlan:
        return rank_plan(list(self.shards), train=self.train, batch_size=self.batch_size, rank=self.rank,
                         world_size=self.world_size, seed=self.seed, epoch=epoch)
