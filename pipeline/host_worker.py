"""The decode process behind `pipeline.host.HostLoader`: reads its own shards, decodes with Pillow, writes uint8 batches
into shared-memory slots that the parent lent it.

A worker never sees image bytes from the parent: it gets (epoch) commands, works out its own samples with the shared
rule in `pipeline/plan.py`, seeks to each sample through the shard's `.idx` file, and tells the parent "slot k
holds batch i". Parent -> worker messages, all tuples: ("epoch", gen, epoch), ("release", gen, slot), ("stop",).
Worker -> parent: ("batch", gen, slot, batch_index, bytes_read, skipped), ("sample_error", gen, text),
("crash", text). `gen` numbers the parent's iterations so that messages about an abandoned one are ignored.
"""
from __future__ import annotations

import io
import os
import random
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Iterator

import numpy as np
from PIL import Image

from pipeline.contract import center_crop_box, random_resized_crop
from pipeline.format import ShardError, read_index
from pipeline.plan import EpochPlanner, batch_segments, worker_batches

# One thread per worker process: the parallelism is the processes; libraries that pool threads would oversubscribe.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class SampleError(ShardError):
    """One sample that cannot be used; the message names the shard file and the sample key."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, picklable and torch-free."""

    worker: int
    num_workers: int
    planner: EpochPlanner  # this rank's shards and the shared rule
    img_size: int
    crop_pct: float
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    shuffle_buffer: int
    skip_bad: bool
    num_classes: int | None  # labels outside [0, num_classes) are corrupt samples; None: not checked
    slot_names: tuple[str, ...]

    @property
    def train(self) -> bool:
        return self.planner.train

    @property
    def batch_size(self) -> int:
        return self.planner.batch_size


@dataclass
class Sample:
    shard: str
    key: str
    jpg: bytes
    cls: bytes


class Interrupted(Exception):
    """A command that ends the current epoch arrived; `message` is it."""

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


def read_samples(segments) -> Iterator[Sample]:
    """The samples of `segments` in order, read by seeking to their offsets (no tar scanning). Indexes are parsed per
    segment, not cached: a worker meets each shard about once an epoch, and a cache of all of ImageNet's indexes
    would cost every worker hundreds of MB."""
    for seg in segments:
        shard = seg.shard
        entries = read_index(shard.index_path, shard.num_samples)
        with open(shard.path, "rb") as f:
            for key, parts in entries[seg.start:seg.stop]:
                data = {}
                for ext in ("jpg", "cls"):
                    if ext in parts:
                        f.seek(parts[ext][0])
                        data[ext] = f.read(parts[ext][1])
                yield Sample(shard.path, key, data.get("jpg", b""), data.get("cls", b""))


def shuffled(samples: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """webdataset-style buffer shuffle: keep `size` samples, emit a random one as each new one arrives."""
    buf: list[Sample] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def parse_label(sample: Sample, num_classes: int | None) -> int:
    try:
        label = int(sample.cls.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError(f"{sample.shard}: sample {sample.key}: .cls is not a decimal label ({sample.cls[:20]!r})")
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SampleError(f"{sample.shard}: sample {sample.key}: label {label} outside [0, {num_classes})")
    return label


def decode(sample: Sample, cfg: WorkerConfig, rng: random.Random, out: np.ndarray) -> None:
    """Crop box first, DCT-scaled decode when the box is >= 2x the output, one resize to the output size, flip, into
    `out` (S,S,3) uint8."""
    size = cfg.img_size
    if not sample.jpg:
        raise SampleError(f"{sample.shard}: sample {sample.key}: no .jpg component")
    try:
        im = Image.open(io.BytesIO(sample.jpg))
        width, height = im.size
        if cfg.train:
            left, top, w, h = random_resized_crop(width, height, rng, cfg.scale, cfg.ratio)
        else:
            left, top, w, h = center_crop_box(width, height, size, cfg.crop_pct)
        if min(w, h) >= 2 * size:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT; draft picks the smallest that keeps the box >= size.
            im.draft("RGB", (width * size / w, height * size / h))
        sx, sy = im.size[0] / width, im.size[1] / height
        if im.mode not in ("RGB", "L", "CMYK"):
            im = im.convert("RGB")  # palette/alpha images (a PNG named .jpg) would resize in the wrong space
        resample = Image.BILINEAR if cfg.train else Image.BICUBIC  # torchvision train / timm ViT eval
        im = im.resize((size, size), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        if im.mode != "RGB":
            im = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises here, the bytes caused it: name the sample
        raise SampleError(f"{sample.shard}: sample {sample.key}: undecodable image ({type(e).__name__}: {e})") from e
    pixels = np.asarray(im)
    out[...] = pixels[:, ::-1] if cfg.train and rng.random() < cfg.hflip else pixels


class Mailbox:
    """The worker's end of the pipe: free slots, and commands that interrupt an epoch."""

    def __init__(self, conn, num_slots: int):
        self.conn = conn
        self.num_slots = num_slots
        self.gen = -1
        self.free: list[int] = []

    def start(self, gen: int) -> None:
        # A new iteration: the parent holds none of our slots any more (it copies out before releasing).
        self.gen = gen
        self.free = list(range(self.num_slots))

    def handle(self, msg) -> None:
        if msg[0] == "release":
            if msg[1] == self.gen:  # a release from an abandoned iteration refers to a slot already reset
                self.free.append(msg[2])
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


def fill_batch(cfg, samples, images, labels, real, rng, stats) -> None:
    """Fill one slot: `real` samples from the stream, then val padding (zeros, label -1). In skip mode a bad val sample
    becomes padding; a bad train sample is replaced by the stream's next, and when the stream runs dry, by a copy of
    a good sample of this batch."""
    filled = 0
    while filled < real:
        sample = next(samples, None)
        if sample is None:
            if filled == 0:
                raise ShardError(f"worker {cfg.worker}: no decodable sample left to fill a batch")
            j = stats.rng_dup.randrange(filled)
            images[filled], labels[filled] = images[j], labels[j]
            filled += 1
            continue
        stats.bytes_read += len(sample.jpg) + len(sample.cls)
        try:
            labels[filled] = parse_label(sample, cfg.num_classes)
            decode(sample, cfg, rng, images[filled])
        except SampleError:
            if not cfg.skip_bad:
                raise
            stats.skipped += 1
            if not cfg.train:
                # Val stays exact: the bad sample's place becomes padding (label -1), no other sample counts twice.
                images[filled], labels[filled] = 0, -1
                filled += 1
            continue
        filled += 1
    images[real:] = 0
    labels[real:] = -1


@dataclass
class Stats:
    rng_dup: random.Random
    bytes_read: int = 0
    skipped: int = 0


def run_epoch(cfg: WorkerConfig, epoch: int, mailbox: Mailbox, slots) -> None:
    plan = cfg.planner.plan(epoch)
    mine = worker_batches(plan.steps, cfg.worker, cfg.num_workers)
    segments, padding = batch_segments(plan, mine)
    real_total = len(mine) * cfg.batch_size - padding
    # Seeded by everything that identifies this stream, so a rerun reproduces it and no two workers share it.
    seed, rank = cfg.planner.seed, cfg.planner.rank
    rng = random.Random(f"{seed}:{epoch}:{rank}:{cfg.worker}")
    samples = read_samples(segments)
    if cfg.train:
        samples = shuffled(samples, cfg.shuffle_buffer, rng)
    stats = Stats(random.Random(f"dup:{seed}:{epoch}:{rank}:{cfg.worker}"))
    for n, batch_index in enumerate(mine):
        slot = mailbox.take_slot()
        images, labels = slots[slot]
        real = min(cfg.batch_size, max(0, real_total - n * cfg.batch_size))
        fill_batch(cfg, samples, images, labels, real, rng, stats)
        mailbox.conn.send(("batch", mailbox.gen, slot, batch_index, stats.bytes_read, stats.skipped))
        stats.bytes_read = stats.skipped = 0


def serve(cfg: WorkerConfig, mailbox: Mailbox, slots) -> None:
    msg = mailbox.conn.recv()
    while msg[0] != "stop":
        if msg[0] != "epoch":
            msg = mailbox.conn.recv()  # a late release for an iteration already over
            continue
        mailbox.start(msg[1])
        try:
            run_epoch(cfg, msg[2], mailbox, slots)
            msg = mailbox.conn.recv()
        except Interrupted as stop:
            msg = stop.message
        except SampleError as e:
            mailbox.conn.send(("sample_error", mailbox.gen, str(e)))
            msg = mailbox.conn.recv()


def worker_main(cfg: WorkerConfig, conn) -> None:
    """Process entry point. Exits quietly when the parent says stop or goes away (EOF on the pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent stops us
    for name in THREAD_ENV:
        os.environ[name] = "1"
    if "torch" in sys.modules:  # imported with the `pipeline` package; keep its pools at one thread too
        sys.modules["torch"].set_num_threads(1)
    shms = [shared_memory.SharedMemory(name=n) for n in cfg.slot_names]
    slots = [slot_arrays(s.buf, cfg.batch_size, cfg.img_size) for s in shms]
    try:
        serve(cfg, Mailbox(conn, len(slots)), slots)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone; nothing to report to
    except BaseException:
        try:
            conn.send(("crash", f"host worker {cfg.worker} (pid {os.getpid()}) failed:\n{traceback.format_exc()}"))
        except OSError:
            pass
        raise SystemExit(1)
    finally:
        del slots
        for s in shms:
            s.close()
