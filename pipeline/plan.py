"""Which samples each rank and worker reads in an epoch: the one rule every backend shares.

The rule (both backends read through it, so they put the same samples in the same batches in the same order):
  1. An epoch's sample sequence is the split's shards, in an order permuted by (seed, epoch) for train and in
     manifest order for val, concatenated.
  2. Rank r of R owns the span [floor(N*r/R), floor(N*(r+1)/R)) of that sequence (N samples in the split).
  3. Train: every rank runs `steps = N // (R*B)` batches and reads the first steps*B samples of its span, so a sample
     is seen at most once per epoch and fewer than R*B samples (the spans' tails) sit out the epoch; which ones
     changes with the shard order. Val: every rank runs `ceil(ceil(N/R) / B)` batches; a rank's span is read whole
     and padded to that many batches with samples labelled -1, which metrics skip, so val counts each sample once.
  4. Batch i of a rank's epoch: for val, positions i*B .. i*B+B-1 of the rank's sequence (past its real samples:
     padding). For train, the rank's steps*B positions are cut into windows of `window` whole batches; each window's
     positions are permuted by (seed, epoch, rank, window) and dealt out to its batches in order. So a batch is a
     pure function of (epoch, i): any process can make any batch, and a window spans a short stretch of shards.
  5. Within a rank, host worker w of W makes batches w, w+W, w+2W, ...; the consumer takes batch i from worker
     i % W, so batches come out in order and the workers read the same window of shards at the same time.
"""
from __future__ import annotations

import bisect
import functools
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

    @functools.cached_property
    def _starts(self) -> list[int]:
        starts, offset = [], 0
        for seg in self.segments:
            starts.append(offset)
            offset += len(seg)
        return starts

    def locate(self, position: int) -> tuple[Shard, int]:
        """(shard, sample index in it) of rank-sequence position `position` < num_real."""
        k = bisect.bisect_right(self._starts, position) - 1
        seg = self.segments[k]
        return seg.shard, seg.start + position - self._starts[k]


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


def share_of(steps: int, share: float, part: int) -> list[int]:
    """The rank-local batch indices of part 0 (`share` of them, spread evenly over the epoch) or part 1 (the rest):
    how the hybrid backend splits an epoch between its two decoders."""
    first = [i for i in range(steps) if math.floor((i + 1) * share) > math.floor(i * share)]
    if part == 0:
        return first
    taken = set(first)
    return [i for i in range(steps) if i not in taken]


def worker_batches(steps: int, worker: int, num_workers: int) -> range:
    """The rank-local batch indices worker `worker` of `num_workers` makes (rule 5)."""
    return range(worker, steps, num_workers)


def consumer_order(steps: int, num_workers: int) -> list[tuple[int, int]]:
    """(worker, rank-local batch index) in the order the consumer yields them: batch order (rule 5)."""
    return [(i % num_workers, i) for i in range(steps)]


# eq=False: an identity hash. The plan caches below key on the planner once per batch; hashing the tuple of every
# shard each time would cost more than the lookup it serves.
@dataclass(frozen=True, eq=False)
class EpochPlanner:
    """One rank's view of a split: its shards and the settings the rule depends on, so that every reader (the host
    loader, its workers, the DALI loader) asks for an epoch's plan the same way. Picklable: workers get a copy."""

    shards: tuple[Shard, ...]  # manifest order
    train: bool
    batch_size: int
    rank: int
    world_size: int
    seed: int
    shuffle_window: int = 1  # train: samples permuted together, rounded up to whole batches (rule 4)

    def order(self, epoch: int) -> list[Shard]:
        return epoch_order(list(self.shards), self.seed, epoch, shuffle=self.train)

    def plan(self, epoch: int) -> RankPlan:
        return _cached_plan(self, epoch)

    @property
    def window_batches(self) -> int:
        return max(1, -(-self.shuffle_window // self.batch_size))

    def batch(self, epoch: int, index: int) -> list[tuple[Shard, int] | None]:
        """The samples of rank-local batch `index` of `epoch` as (shard, sample index), None for padding (rule 4)."""
        plan, size = self.plan(epoch), self.batch_size
        if not 0 <= index < plan.steps:
            raise IndexError(f"batch {index} of an epoch of {plan.steps}")
        if self.train:
            first = index - index % self.window_batches
            window = _window(self, epoch, first, min(first + self.window_batches, plan.steps))
            positions = window[(index - first) * size:(index - first + 1) * size]
        else:
            positions = range(index * size, (index + 1) * size)
        return [plan.locate(p) if p < plan.num_real else None for p in positions]


@functools.lru_cache(maxsize=4)
def _cached_plan(planner: EpochPlanner, epoch: int) -> RankPlan:
    return rank_plan(list(planner.shards), train=planner.train, batch_size=planner.batch_size, rank=planner.rank,
                     world_size=planner.world_size, seed=planner.seed, epoch=epoch)


@functools.lru_cache(maxsize=4)
def _window(planner: EpochPlanner, epoch: int, first: int, last: int) -> list[int]:
    """The permuted positions of the train window of batches [first, last): a window is asked for once per batch."""
    positions = list(range(first * planner.batch_size, last * planner.batch_size))
    random.Random(f"{planner.seed}:{epoch}:{planner.rank}:{first}").shuffle(positions)
    return positions
