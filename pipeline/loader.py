"""What every backend is: built from a `LoaderSpec`, a `Loader` that yields `(images, labels)` already on
`spec.device`, epoch by epoch:
  images  NCHW, `spec.dtype`; normalized with the model's mean/std, or raw 0..255 when `spec.dtype` is torch.uint8
          (for a model that folds normalization into its patch embedding); the pixels follow `spec.transform`
          (pipeline/transforms.py);
  labels  int64; -1 marks val padding samples that metrics must skip.
`Loader` holds everything a caller may use (nobody probes a loader with hasattr); `ShardLoader` adds what the
backends that read shards share: the shard list and the epoch plan, and `EpochRun`, the one rule by which a
loader's producers run on from one epoch into the next.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.plan import EpochPlanner, Stage, share_of
from pipeline.resolution import ResSchedule
from pipeline.shards.errors import ShardError
from pipeline.shards.format import Manifest, Shard, read_manifest, shard_list
from pipeline.augment import Augment, parse as parse_augment
from pipeline.transforms import Transform

IMAGENET_CLASSES = 1000  # what synthetic labels stand in for when no shards say otherwise


@dataclass
class LoaderSpec:
    data_path: str | None
    split: str  # "train" | "val"
    batch_size: int  # per rank
    device: torch.device
    rank: int = 0
    world_size: int = 1
    workers: int = 4  # decode processes (host) or threads (dali) per rank
    seed: int = 0
    img_size: int = 224  # the output side; with res_schedule, its largest (what buffers are sized for)
    res_schedule: ResSchedule | None = None  # train: the side per epoch (pipeline/resolution.py)
    # The transform policy's knobs (pipeline/transforms.py says what each means; its defaults are these)
    mean: tuple[float, float, float] = Transform.mean
    std: tuple[float, float, float] = Transform.std
    crop_pct: float = Transform.crop_pct
    scale: tuple[float, float] = Transform.scale
    ratio: tuple[float, float] = Transform.ratio
    hflip: float = Transform.hflip
    aa: str | None = None  # train: timm's --aa spec (pipeline/augment.py), e.g. "rand-m9-mstd0.5-inc1"
    color_jitter: str | float | None = None  # train: timm's --color-jitter (off under aa, as in timm)
    dtype: torch.dtype = torch.float32  # torch.uint8: unnormalized pixels
    channels_last: bool = False
    prefetch: int = 2  # batches in flight ahead of the consumer
    shuffle_window: int = 4096  # train: samples permuted together (pipeline/plan.py rule 4), about 4 ImageNet shards
    aug_repeats: int = 1  # train: timm's --aug-repeats, each epoch reads ~1/N of the samples N times (plan rule 7)
    on_error: str = "raise"  # "raise": a bad sample stops the run naming shard and key; "skip": count, replace
    shard_problems: dict[str, str] | None = None  # by shard file name: what a check of their contents found
    # (pipeline/shards/contents.py); each is treated as a shard of the wrong size is
    num_classes: int = IMAGENET_CLASSES  # synthetic labels
    options: object = None  # the backend's own typed options (pipeline.host.HostOptions, pipeline.dali.DaliOptions);
    # None = that backend's defaults
    part: tuple[float, int] | None = None  # (share, 0 or 1): make only that part of each epoch's batches (hybrid)
    resumed_epoch: int | None = None  # train: the epoch an elastic resume continues (pipeline/plan.py rule 6); the
    stages: tuple[Stage, ...] = ()  # layouts that ran part of it. The loader's length is that epoch's rest.

    @property
    def train(self) -> bool:
        return self.split == "train"

    @property
    def transform(self) -> Transform:
        """The split's transform policy (pipeline/transforms.py), which every decoder follows, at img_size."""
        return self.transform_at(self.img_size)

    def transform_at(self, size: int) -> Transform:
        """The policy at output side `size`."""
        augment = parse_augment(self.aa, self.color_jitter, self.mean) if self.train else Augment()
        return Transform(self.train, size, tuple(self.scale), tuple(self.ratio), self.hflip, self.crop_pct,
                         tuple(self.mean), tuple(self.std), augment)

    def size_at(self, epoch: int) -> int:
        """The output side of `epoch`'s batches."""
        return self.res_schedule.size(epoch) if self.res_schedule is not None and self.train else self.img_size

    @property
    def sides(self) -> tuple[int, ...]:
        """Every side this loader's batches can have, in any epoch (the schedule's is max_res from end_ramp on)."""
        if self.res_schedule is None or not self.train:
            return (self.img_size,)
        return tuple(sorted(set(self.res_schedule.sizes(self.res_schedule.end_ramp + 1))))

    def validate(self) -> None:
        if self.split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {self.shuffle_window}")
        if self.aug_repeats < 1:
            raise ValueError(f"aug_repeats must be >= 1 (1 = no repeated augmentation), got {self.aug_repeats}")
        parse_augment(self.aa, self.color_jitter, self.mean)  # AugmentError: one line, the flag named
        if self.res_schedule is not None:
            self.res_schedule.validate()
            if self.img_size != self.res_schedule.max_res:
                raise ValueError(f"img_size {self.img_size} must be the schedule's max_res "
                                 f"{self.res_schedule.max_res} (buffers are sized for it)")

    def backend_options(self, cls):
        """This spec's options for the backend whose options class is `cls`: checked, defaults when None."""
        opts = cls() if self.options is None else self.options
        if not isinstance(opts, cls):
            raise TypeError(f"options for this backend are a {cls.__name__}, got {type(opts).__name__}")
        opts.validate()
        return opts

    @property
    def repeats_note(self) -> str:
        """For a loader's describe(): the repeated augmentation, where the plan applies it (train only)."""
        repeated = self.train and self.aug_repeats > 1
        return f", {self.aug_repeats} augmented copies of each sample read" if repeated else ""

    def batches(self, steps: int) -> list[int]:
        """The rank-local batch indices this loader makes each epoch: all of them, or its part (hybrid)."""
        return list(range(steps)) if self.part is None else share_of(steps, *self.part)

    def planner(self, shards: list[Shard]) -> EpochPlanner:
        """The epoch/rank plan of this rank over `shards` (pipeline/plan.py)."""
        return EpochPlanner(tuple(shards), self.train, self.batch_size, self.rank, self.world_size, self.seed,
                            self.shuffle_window, self.resumed_epoch, tuple(self.stages), self.aug_repeats)


class Loader:
    """The protocol every backend honours, with the defaults of a loader that reads nothing (synthetic)."""

    bytes_read: int = 0  # compressed bytes read from shards, all epochs (a backend that reads adds to it)

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.epoch = 0
        self.steps = 0  # batches per epoch, equal on every rank
        self.num_workers = spec.workers  # decode processes or threads actually used
        self._skipped: dict[str, int] = {}

    @property
    def skipped_shards(self) -> dict[str, int]:
        """on_error="skip": shard file name -> samples replaced there, all epochs."""
        return self._skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the run log: what makes the batches, and how."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """One line each for what the user should hear when the loader starts (a slower setup than intended)."""
        return []

    def close(self) -> None:
        """Free processes and memory. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EpochRun:
    """Whether a loader's producers can run on: they make epoch after epoch (the host workers, DALI's source), so
    the next epoch's first batches are made while this one's last steps train. A run starts at an epoch and
    counts the batches taken from it; the epoch asked for follows on when whole epochs were taken and it is the
    next one. Val reads the same batches every epoch, so there any epoch follows on."""

    def __init__(self, train: bool, steps: int):
        self.train, self.steps = train, steps
        self.number = 0  # numbers the runs: messages about an abandoned run are told apart by it
        self.first_epoch: int | None = None
        self.taken = 0

    def follows(self, epoch: int) -> bool:
        if self.first_epoch is None or not self.steps or self.taken % self.steps:
            return False
        return not self.train or self.first_epoch + self.taken // self.steps == epoch

    def restart(self, epoch: int) -> None:
        self.number, self.first_epoch, self.taken = self.number + 1, epoch, 0

    def stop(self) -> None:
        """The producers are gone: the next iteration starts a new run."""
        self.first_epoch = None

    @property
    def epoch(self) -> int:
        """The run's epoch that the next batch taken belongs to."""
        return self.first_epoch + self.taken // self.steps


class ShardLoader(Loader):
    """A loader that reads shards: this rank's plan over the split, and one iteration at a time. A backend defines
    `start_run(epoch)` (its producers begin a new run, `self.run`, at `epoch`) and `take(step)` (the next batch of
    the run, batch `self.batches[step]` of `self.run.epoch`, moved on from the producers); iterating calls them."""

    def __init__(self, spec: LoaderSpec, backend: str):
        super().__init__(spec)
        if spec.data_path is None:
            raise ValueError(f"the {backend} backend reads shards: pass data_path (a folder made by "
                             f"tools/make_shards.py)")
        self.manifest: Manifest = read_manifest(spec.data_path)
        shards = shard_list(spec.data_path, spec.split, self.manifest, spec.shard_problems)
        unlike = [s for s in shards if s.problem]
        if unlike and spec.on_error == "raise":  # before a sample is trained on; "skip" counts each of their samples
            more = f" (and {len(unlike) - 1} more shards)" if len(unlike) > 1 else ""
            raise ShardError(f"{unlike[0].path}: {unlike[0].problem}{more}")
        self.planner = spec.planner(shards)
        # All of an epoch's batches, or a hybrid's part; the first epoch's (a resumed one may be shorter). Raises
        # when the split cannot fill one batch per rank.
        self.batches = spec.batches(self.planner.plan(self.planner.first_epoch).steps)
        self.steps = len(self.batches)
        self.run = EpochRun(spec.train, self.steps)
        self._iteration = 0

    def start_run(self, epoch: int) -> None:
        raise NotImplementedError

    def take(self, step: int):
        raise NotImplementedError

    def finish(self, taken):
        """What `take` returned, as the consumer gets it (a backend that takes ahead finishes the transfer here)."""
        return taken

    def ahead(self) -> int:
        """Batches taken before the consumer asks for them."""
        return 0

    def __iter__(self):
        self._iteration += 1  # a new iteration abandons any earlier one still suspended
        iteration = self._iteration
        if not self.run.follows(self.epoch):
            self.run.restart(self.epoch)
            try:
                self.start_run(self.epoch)
            except BaseException:
                self.close()  # and so the run stops: the next iteration starts one anew
                raise
        pending, steps = [], iter(range(self.steps))
        for _ in range(self.steps):
            if iteration != self._iteration:  # outside the try below: the newer iteration goes on
                raise RuntimeError(f"a newer iteration over this {type(self).__name__} replaced this one")
            try:
                while len(pending) <= self.ahead() and (step := next(steps, None)) is not None:
                    pending.append(self.take(step))
                    self.run.taken += 1
                batch = self.finish(pending.pop(0))
            except BaseException:
                self.close()  # decode errors, Ctrl-C: no orphans, no leaked memory; iterating again starts anew
                raise
            yield batch  # a consumer that stops early: the next iteration runs on if this epoch was all taken


def endless(loader: Loader, stride: int = 1):
    """Batches from epoch 0, stride, 2*stride, ... back to back: for benchmarks that run by the clock, not by epochs.
    A stride above 1 makes every epoch a jump, which a loader cannot run on into."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += stride


def timed(batches: Iterator) -> Iterator[tuple[object, float]]:
    """(batch, seconds the caller was blocked waiting for it): the input wait every timing loop reports. Host time
    only: device work queued earlier may still run while the host waits, so it bounds the device's idle time."""
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0
