"""The decode process behind `pipeline.host.HostLoader`: reads its own shards, decodes with Pillow, writes uint8 batches
into shared-memory slots that the parent lent it.

A worker never sees image bytes from the parent: it gets `StartRun` commands, works out its own batches with the
shared rule in `pipeline/plan.py`, reads their samples with the one reader (`pipeline/shards/reader.py`), and tells
the parent `BatchReady` ("slot k holds batch i"). A batch's crops and flips are seeded by (seed, epoch, rank, batch),
so the batches do not depend on how many workers made them. After `StartRun` a worker runs on into the following
epochs, as far as its free slots allow, so the next epoch's first batches are ready when it starts; a new `StartRun`
(a new run number, `pipeline.shard_loader.EpochRun`) restarts it elsewhere, and messages about an abandoned run are
ignored.
"""
from __future__ import annotations

import functools
import os
import random
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np

from pipeline.plan import EpochPlanner, share_of, worker_batches
from pipeline.processes import keep_freed_memory_in_the_heap, leave_stop_signals_to_the_parent
from pipeline.resolution import ResSchedule
from pipeline.shards.errors import SampleError, ShardError
from pipeline.shards.jpeg import crop_resize
from pipeline.shards.reader import Sample, ShardReader, usable_label
from pipeline.transforms import PIL_RESAMPLE, Transform, rgb_into


# -- the messages, parent -> worker ---------------------------------------------------------------------------------
class StartRun(NamedTuple):
    run: int  # the parent's run number
    epoch: int  # the run's first epoch
    start: int = 0  # of that epoch's batches (the loader's k-th), the first to make: the loader's position
    stages: tuple = ()  # the layouts that read part of that epoch before (pipeline/plan.py rule 6)


class Release(NamedTuple):
    run: int
    slot: int  # the parent has copied it out: the worker may fill it again


class Stop(NamedTuple):
    pass


# -- worker -> parent -------------------------------------------------------------------------------------------------
class BatchReady(NamedTuple):
    run: int
    slot: int
    epoch: int
    index: int  # the rank-local batch index
    bytes_read: int  # compressed bytes since the last BatchReady
    skipped: dict  # shard file name -> samples replaced (on_error="skip")


class SampleFailed(NamedTuple):
    run: int
    text: str  # one line naming shard and sample
    one_sample: bool  # a SampleError (one bad sample) rather than a shard that cannot be read


class Crashed(NamedTuple):
    text: str  # `crash_report`'s line




@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, picklable and torch-free."""

    worker: int
    num_workers: int
    planner: EpochPlanner  # this rank's shards and the shared rule
    transform: Transform  # the split's policy (pipeline/transforms.py)
    skip_bad: bool
    num_classes: int | None  # labels outside [0, num_classes) are corrupt samples; None: not checked
    slot_names: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()  # the parent's AWS_* settings (a forkserver may predate them)
    part: tuple[float, int] | None = None  # (share, part): the loader makes only that part of each epoch (hybrid)
    decoder: str = "pillow"  # pipeline/shards/jpeg.py: "region" or "pillow"
    schedule: ResSchedule | None = None  # train: the side per epoch (pipeline/resolution.py); slots fit the largest
    resized: tuple[Transform, ...] = ()  # the policy at each side of the schedule but `transform`'s

    def transform_at(self, epoch: int) -> Transform:
        """The policy of `epoch`'s batches: its side by the schedule."""
        if self.schedule is None or not self.train:
            return self.transform
        side = self.schedule.size(epoch)
        return next((t for t in (self.transform, *self.resized) if t.img_size == side), self.transform)

    @property
    def train(self) -> bool:
        return self.planner.train

    @property
    def img_size(self) -> int:
        return self.transform.img_size

    @property
    def batch_size(self) -> int:
        return self.planner.batch_size


class Interrupted(Exception):
    """A command that ends the current run arrived (`StartRun` or `Stop`); `message` is it."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


def slot_arrays(buf, batch_size: int, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (B,S,S,3) uint8 image array and the (B,) int64 label array laid out in one shared-memory slot."""
    image_bytes = batch_size * img_size * img_size * 3
    images = np.ndarray((batch_size, img_size, img_size, 3), np.uint8, buffer=buf)
    labels = np.ndarray((batch_size,), np.int64, buffer=buf, offset=image_bytes)
    return images, labels


def slot_nbytes(batch_size: int, img_size: int) -> int:
    return batch_size * img_size * img_size * 3 + batch_size * 8


def decode(sample: Sample, cfg: WorkerConfig, rng: random.Random, out: np.ndarray, t: Transform) -> None:
    """The sample's crop box by the transform policy `t` (the epoch's), decoded and resized to its output size
    (pipeline/shards/jpeg.py), flipped, into `out` (S,S,3) uint8, then augmented there. The sample is usable
    (`usable_label`)."""
    try:
        image = crop_resize(sample.jpg, functools.partial(t.crop_box, rng=rng), t.img_size,
                            PIL_RESAMPLE[t.interpolation], cfg.decoder)
    except Exception as e:  # noqa: BLE001 - whatever Pillow or libjpeg raise here, the bytes caused it: name the sample
        raise SampleError(f"{sample.shard}: sample {sample.key}: undecodable image ({type(e).__name__}: {e})") from e
    rgb_into(image, out, flip=t.flips(rng))
    if t.augment.active:  # after the crop and flip, on the output tile, as timm applies it
        t.augment.apply(out, rng)


def crash_report(worker: int, error: BaseException) -> str:
    """One line for the parent to raise: the error and where it happened, and a file with the whole traceback (what
    a bug report needs), in the temp folder. (Input errors never get here: `serve` sends those as they are.)"""
    path = os.path.join(tempfile.gettempdir(), f"vitpipe-worker-{os.getpid()}.traceback")
    try:
        with open(path, "w") as f:
            f.write(traceback.format_exc())
        where = f"; traceback in {path}"
    except OSError:
        where = ""
    frames = traceback.extract_tb(error.__traceback__)
    at = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    text = (str(error).splitlines() or [""])[0]
    return f"host worker {worker} (pid {os.getpid()}) failed: {type(error).__name__}: {text}{at}{where}"


class Mailbox:
    """The worker's end of the pipe: free slots, and commands that interrupt an epoch."""

    def __init__(self, conn, num_slots: int):
        self.conn = conn
        self.num_slots = num_slots
        self.run = -1
        self.free: list[int] = []

    def start(self, run: int) -> None:
        # A new run: the parent holds none of our slots any more (it copies out before releasing).
        self.run = run
        self.free = list(range(self.num_slots))

    def handle(self, msg) -> None:
        if isinstance(msg, Release):
            if msg.run == self.run:  # a release from an abandoned run refers to a slot already reset
                self.free.append(msg.slot)
        else:
            raise Interrupted(msg)

    def poll(self) -> None:
        while self.conn.poll():
            self.handle(self.conn.recv())

    def take_slot(self) -> int:
        self.poll()
        while not self.free:
            self.handle(self.conn.recv())
        return self.free.pop(0)


def fill_batch(cfg: WorkerConfig, samples: list[Sample | None], images, labels, rng: random.Random,
               stats: "Stats", transform: Transform) -> None:
    """Decode one batch into a slot; None entries are val padding (zeros, label -1). In skip mode a bad val sample
    becomes padding (val stays exact), a bad train sample a copy of a good sample of the same batch."""
    bad = []
    for i, sample in enumerate(samples):
        if sample is None:
            images[i], labels[i] = 0, -1
            continue
        stats.bytes_read += sample.nbytes
        try:
            labels[i] = usable_label(sample, cfg.num_classes)
            decode(sample, cfg, rng, images[i], transform)
        except SampleError:
            if not cfg.skip_bad:
                raise
            name = os.path.basename(sample.shard)
            stats.skipped[name] = stats.skipped.get(name, 0) + 1
            images[i], labels[i] = 0, -1
            bad.append(i)
    if cfg.train and bad:
        good = sorted(set(range(len(samples))) - set(bad))
        if not good:
            raise ShardError(f"worker {cfg.worker}: no decodable sample in a whole batch (first: "
                             f"{samples[bad[0]].shard}, sample {samples[bad[0]].key})")
        for i in bad:
            j = good[rng.randrange(len(good))]
            images[i], labels[i] = images[j], labels[j]


@dataclass
class Stats:
    bytes_read: int = 0
    skipped: dict = field(default_factory=dict)  # shard file name -> samples skipped there


def run_epoch(cfg: WorkerConfig, planner: EpochPlanner, epoch: int, start: int, mailbox: Mailbox, slots,
              reader: ShardReader, read_ahead: ThreadPoolExecutor) -> int:
    """Make this worker's batches of `epoch` from the loader's `start`-th on; returns how many the loader makes in
    that epoch (all workers together)."""
    stats, transform = Stats(), cfg.transform_at(epoch)
    steps = planner.plan(epoch).steps
    batches = share_of(steps, *cfg.part) if cfg.part is not None else range(steps)
    mine = [batches[k] for k in worker_batches(len(batches), cfg.worker, cfg.num_workers) if k >= start]
    # The next batch's bytes are read on a thread while this one decodes: reading waits on the disk or the network
    # (object storage: round trips), decoding on the CPU, so they overlap.
    pending = read_ahead.submit(reader.read_batch, planner, epoch, mine[0]) if mine else None
    for k, batch_index in enumerate(mine):
        slot = mailbox.take_slot()
        images, labels = slots(transform.img_size)[slot]
        samples = pending.result()
        if k + 1 < len(mine):
            pending = read_ahead.submit(reader.read_batch, planner, epoch, mine[k + 1])
        # Seeded by everything that identifies the batch: a rerun reproduces it, whichever worker makes it.
        rng = random.Random(f"{planner.seed}:{epoch}:{planner.rank}:{batch_index}")
        fill_batch(cfg, samples, images, labels, rng, stats, transform)
        mailbox.conn.send(BatchReady(mailbox.run, slot, epoch, batch_index, stats.bytes_read, stats.skipped))
        stats.bytes_read, stats.skipped = 0, {}
    return len(batches)


def serve(cfg: WorkerConfig, mailbox: Mailbox, slots) -> None:
    reader, read_ahead = ShardReader(), ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
    msg = mailbox.conn.recv()
    while not isinstance(msg, Stop):
        if not isinstance(msg, StartRun):
            msg = mailbox.conn.recv()  # a late release for a run already over
            continue
        mailbox.start(msg.run)
        epoch, start = msg.epoch, msg.start
        # An epoch that other layouts read part of has a plan of its own (pipeline/plan.py rule 6); the rest are whole
        planner = cfg.planner.at(epoch, msg.stages)
        try:
            # Epoch after epoch, until a command interrupts (take_slot waits for free slots). Only the rest of a
            # resumed epoch may have no batch for the loader; the epochs after it have.
            while run_epoch(cfg, planner, epoch, start, mailbox, slots, reader, read_ahead) or (
                    epoch == msg.epoch and msg.stages):
                epoch, start = epoch + 1, 0
            msg = mailbox.conn.recv()
        except Interrupted as stop:
            msg = stop.message
        except ShardError as e:  # a sample, or a shard that cannot be read: one line for the parent to raise
            mailbox.conn.send(SampleFailed(mailbox.run, str(e), isinstance(e, SampleError)))
            msg = mailbox.conn.recv()


def worker_main(cfg: WorkerConfig, conn) -> None:
    """Process entry point. Exits quietly when the parent says stop or goes away (EOF on the pipe)."""
    leave_stop_signals_to_the_parent()  # a Ctrl-C or SIGTERM to the whole group: the trainer stops us
    os.environ.update(dict(cfg.environment))  # one thread each came with the start (pipeline.processes)
    keep_freed_memory_in_the_heap()
    shms = [shared_memory.SharedMemory(name=n) for n in cfg.slot_names]
    views: dict[int, list] = {}

    def slots(side: int) -> list:
        """The slots as arrays of side `side` (one per epoch's side; each fits in the largest's bytes)."""
        if side not in views:
            views[side] = [slot_arrays(s.buf, cfg.batch_size, side) for s in shms]
        return views[side]
    try:
        serve(cfg, Mailbox(conn, len(shms)), slots)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone; nothing to report to
    except BaseException as e:
        try:
            conn.send(Crashed(crash_report(cfg.worker, e)))
        except OSError:
            pass
        raise SystemExit(1)
    finally:
        views.clear()
        for s in shms:
            s.close()
