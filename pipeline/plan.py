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
  6. Resuming a train epoch on another world size or batch size (an elastic resume): the layouts that ran part of it
     are its `Stage`s. Each stage took, from every rank, the samples of its first `steps_done` batches; the epoch's
     sequence less those samples (kept in sequence order, the spans' unread tails included) is the sequence that
     the next layout splits by rules 2-4. So no sample is read twice in an epoch, and fewer than R*B samples of the
     last layout sit it out, as in rule 3.
  7. Repeated augmentation (train, `aug_repeats` a > 1; timm's --aug-repeats, DeiT's sampler): U is the first
     ceil(N/a) samples of the epoch's sequence (which ones changes with the shard order, as rule 3's tails do) and E
     is U with each sample repeated a times in a row. Rank r's sequence is E's positions r, r+R, r+2R, ..., so its
     position p is sample U[(r + p*R) // a]; every rank runs `steps = (a*|U| // R) // B` batches, its first steps*B
     positions, which rule 4 deals out as above. So the ranks read E's first R*steps*B positions: as many samples
     as without repeats, give or take a batch per rank, about 1/a of them distinct (E's tail, fewer than R*B
     positions, sits out: the last few samples of U are read fewer than a times). The copies of U[i] are E
     positions a*i .. a*i+a-1, on ranks (a*i + c) % R: each on a different rank at about the same step when a <= R
     (when a > R some copies share a rank, as timm allows). Each copy is a batch sample of its own, with its own
     crop and augmentation. An elastic resume (rule 6) of such an epoch is refused: it resumes only on its own
     world size and batch size.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from dataclasses import dataclass, replace

from pipeline.shards.errors import SettingsError
from pipeline.shards.format import Shard


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
    """What one rank reads in one epoch: `num_real` samples out of `segments`, then `steps*batch_size - num_real`
    padding samples (label -1, val only). Rank-sequence position p is sample (offset + p*stride) // repeats of the
    segments, concatenated: sample p, but for repeated augmentation (rule 7: repeats a, stride R, offset r % a)."""

    segments: tuple[Segment, ...]
    steps: int
    batch_size: int
    num_real: int
    repeats: int = 1
    stride: int = 1
    offset: int = 0

    @functools.cached_property
    def _starts(self) -> list[int]:
        starts, offset = [], 0
        for seg in self.segments:
            starts.append(offset)
            offset += len(seg)
        return starts

    def locate(self, position: int) -> tuple[Shard, int]:
        """(shard, sample index in it) of rank-sequence position `position` < num_real."""
        index = (self.offset + position * self.stride) // self.repeats
        k = bisect.bisect_right(self._starts, index) - 1
        seg = self.segments[k]
        return seg.shard, seg.start + index - self._starts[k]


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


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, train: bool, aug_repeats: int = 1) -> int:
    if train:  # rule 7's expanded sequence: a*ceil(N/a) positions, N for a = 1
        return aug_repeats * -(-num_samples // aug_repeats) // world_size // batch_size
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def _segments(pieces: list[Segment], start: int, stop: int) -> list[Segment]:
    """Cut samples [start, stop) of the concatenated pieces into segments."""
    out, offset = [], 0
    for piece in pieces:
        lo, hi = max(start, offset), min(stop, offset + len(piece))
        if lo < hi:
            out.append(Segment(piece.shard, piece.start + lo - offset, piece.start + hi - offset))
        offset += len(piece)
        if offset >= stop:
            break
    return out


@dataclass(frozen=True)
class Stage:
    """A layout that trained part of an epoch before an elastic resume (rule 6): `steps_done` batches of
    `batch_size` on each of `world_size` ranks."""

    world_size: int
    batch_size: int
    steps_done: int


@dataclass(frozen=True)
class Position:
    """Where a loader stands in `epoch`: `batch` batches of it handed out, `stages` the layouts that read part of it
    before this one (rule 6; none: the epoch is whole here). The count goes on across layouts, as torchdata's
    StatefulDataLoader counts (and so Lightning's loop): the first `offset` batches were the earlier layouts', and
    this layout's batch `local` of its rest of the epoch is the next."""

    epoch: int = 0
    stages: tuple[Stage, ...] = ()
    batch: int = 0

    @property
    def offset(self) -> int:
        return sum(stage.steps_done for stage in self.stages)

    @property
    def local(self) -> int:
        return self.batch - self.offset


def continue_epoch(position: Position, then: tuple[int, int], now: tuple[int, int]) -> Position:
    """Where `position`, taken in layout `then` (world size, batch size), goes on in layout `now`: at its batch in
    the same layout; in another (an elastic resume) at the start of what no layout has read of that epoch yet, with
    `then` as one more stage when it read any of it (rule 6)."""
    if then == now or not position.local:
        return position
    return Position(position.epoch, position.stages + (Stage(*then, position.local),), position.batch)


def rest_samples(total: int, stages: tuple[Stage, ...]) -> int:
    """How many of an epoch's `total` samples no stage has read (rule 6 takes `steps_done` batches from each rank):
    the size of the sequence the next layout splits. For a loader that reads no shards (synthetic)."""
    for stage in stages:
        size = stage.world_size * stage.batch_size
        total -= min(stage.steps_done, total // size) * size
    return total


def window_batches(shuffle_window: int, batch_size: int) -> int:
    return max(1, -(-shuffle_window // batch_size))


def window_order(seed: int, epoch: int, rank: int, first: int, last: int, batch_size: int, level: int) -> list[int]:
    """The rank positions of train batches [first, last) (one window), permuted (rule 4). `level`: how many stages
    ran before this layout in the epoch (rule 6); 0 keeps the key of a run never resumed elastically."""
    positions = list(range(first * batch_size, last * batch_size))
    key = f"{seed}:{epoch}:{rank}:{first}" + (f":{level}" if level else "")
    random.Random(key).shuffle(positions)
    return positions


def remaining(pieces: list[Segment], stage: Stage, *, seed: int, epoch: int, level: int,
              shuffle_window: int) -> list[Segment]:
    """The epoch's sequence `pieces` less what `stage` read of it (rule 6), in sequence order."""
    total, (ranks, size) = sum(map(len, pieces)), (stage.world_size, stage.batch_size)
    steps, per_window = total // (ranks * size), window_batches(shuffle_window, size)
    done = min(stage.steps_done, steps)
    first = done - done % per_window
    last = min(first + per_window, steps)
    starts = list(itertools.accumulate(map(len, pieces), initial=0))
    out: list[Segment] = []

    def keep(seg: Segment) -> None:  # merging neighbours: a window's leftovers come one sample at a time
        if out and out[-1].shard is seg.shard and out[-1].stop == seg.start:
            out[-1] = Segment(seg.shard, out[-1].start, seg.stop)
        else:
            out.append(seg)

    for rank in range(ranks):
        lo, hi = rank_span(total, rank, ranks)
        window = window_order(seed, epoch, rank, first, last, size, level)
        taken = set(window[:(done - first) * size])
        for p in range(lo + first * size, lo + last * size):  # the window in progress: what it has not read
            if p - lo not in taken:
                k = bisect.bisect_right(starts, p) - 1
                piece = pieces[k]
                keep(Segment(piece.shard, piece.start + p - starts[k], piece.start + p - starts[k] + 1))
        for seg in _segments(pieces, lo + last * size, hi):
            keep(seg)
    return out


def rank_plan(shards: list[Shard], *, train: bool, batch_size: int, rank: int, world_size: int, seed: int,
              epoch: int, stages: tuple[Stage, ...] = (), shuffle_window: int = 1, aug_repeats: int = 1) -> RankPlan:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or aug_repeats < 1:
        raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size} / "
                         f"aug_repeats={aug_repeats}")
    repeats = aug_repeats if train else 1  # val reads each sample once
    if repeats > 1 and stages:  # rule 6 would have to know which copies each stage read
        raise ValueError(f"an epoch with repeated augmentation (aug_repeats={repeats}) resumes only on its own world "
                         f"size and batch size")
    pieces = [Segment(s, 0, s.num_samples) for s in epoch_order(shards, seed, epoch, shuffle=train)]
    for level, stage in enumerate(stages):
        pieces = remaining(pieces, stage, seed=seed, epoch=epoch, level=level, shuffle_window=shuffle_window)
    total = sum(map(len, pieces))
    steps = steps_per_epoch(total, batch_size, world_size, train, repeats)
    if train and steps == 0 and not stages:  # a resumed epoch's rest may be too short: it then ends at once
        raise SettingsError(f"{total} train samples cannot fill one batch of {batch_size} on each of {world_size} "
                         f"ranks; lower --batch-size")
    if repeats > 1:  # rule 7: the rank's positions draw from U[first, last), U being a prefix of the pieces
        positions = steps * batch_size
        first, last = rank // repeats, (rank + (positions - 1) * world_size) // repeats + 1
        return RankPlan(tuple(_segments(pieces, first, last)), steps, batch_size, positions, repeats, world_size,
                        rank % repeats)
    lo, hi = rank_span(total, rank, world_size)
    if train:
        hi = lo + steps * batch_size  # the span's tail sits out this epoch
    return RankPlan(tuple(_segments(pieces, lo, hi)), steps, batch_size, hi - lo)


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


def worker_of(step: int, num_workers: int) -> int:
    """The worker the consumer takes its batch `step` from (rule 5): the one whose `worker_batches` hold it."""
    return step % num_workers


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
    resumed_epoch: int | None = None  # an epoch resumed on another layout, and the layouts that ran part of it
    stages: tuple[Stage, ...] = ()  # (`at` makes such a planner)
    aug_repeats: int = 1  # train: copies of each sample an epoch reads (rule 7); 1 = none

    def plan(self, epoch: int) -> RankPlan:
        return _cached_plan(self, epoch)

    def at(self, epoch: int, stages: tuple[Stage, ...]) -> "EpochPlanner":
        """This plan with `epoch` the rest of an epoch that the layouts `stages` read part of (rule 6); itself when
        none did."""
        return replace(self, resumed_epoch=epoch, stages=stages) if stages else self

    def stages_of(self, epoch: int) -> tuple[Stage, ...]:
        return self.stages if epoch == self.resumed_epoch else ()

    @property
    def window_batches(self) -> int:
        return window_batches(self.shuffle_window, self.batch_size)

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
                     world_size=planner.world_size, seed=planner.seed, epoch=epoch, stages=planner.stages_of(epoch),
                     shuffle_window=planner.shuffle_window, aug_repeats=planner.aug_repeats)


@functools.lru_cache(maxsize=4)
def _window(planner: EpochPlanner, epoch: int, first: int, last: int) -> list[int]:
    """The permuted positions of the train window of batches [first, last): a window is asked for once per batch."""
    return window_order(planner.seed, epoch, planner.rank, first, last, planner.batch_size,
                        len(planner.stages_of(epoch)))
