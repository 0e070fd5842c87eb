"""What every backend is: built from a `LoaderSpec`, a `Loader` that yields `Batch(images, labels)` already on
`spec.device`, epoch by epoch:
  images  NCHW, `spec.dtype`; normalized with the model's mean/std, or raw 0..255 when `spec.dtype` is torch.uint8
          (for a model that folds normalization into its patch embedding); the pixels follow `spec.transform`
          (pipeline/transforms.py); `Batch.side` is their side (the epoch's, under a schedule);
  labels  int64; -1 marks val padding samples that metrics must skip.
The loader owns its epoch: where it stands (`Position`: epoch, batches handed out, the layouts that read part of
the epoch before), how many batches an epoch has, and its side. `state_dict()` / `load_state_dict()` save and
restore that position with torchdata's `StatefulDataLoader` meaning, on another world size too (pipeline/plan.py
rule 6), so any training loop (train.py, Lightning, Accelerate, a plain loop) resumes exactly.
`Loader` holds everything a caller may use (nobody probes a loader with hasattr); pipeline/shard_loader.py adds
what the backends that read shards share.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from pipeline.plan import EpochPlanner, Position, Stage, continue_epoch, share_of
from pipeline.resolution import ResSchedule
from pipeline.shards.errors import PipelineError
from pipeline.shards.format import Shard, ShardSet
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
    shards: ShardSet | None = None  # the set at data_path, opened already (open_shard_set); None: the loader opens it

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
                            self.shuffle_window, aug_repeats=self.aug_repeats)

    @property
    def repeats(self) -> int:
        return self.aug_repeats if self.train else 1  # val reads each sample once


STATE_FORMAT = 1  # of `Loader.state_dict()`; a state of another format is refused in one line


class StateError(PipelineError):
    """A loader state that does not fit this loader (another shard set, seed or split); the message says what."""


class Batch(NamedTuple):
    """What a loader yields: unpacks as `images, labels = batch`, and says its side."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def side(self) -> int:
        """The images' side in pixels (NCHW, square): the epoch's, under a schedule (pipeline/resolution.py)."""
        return self.images.shape[-1]


class Loader:
    """The protocol every backend honours, with the defaults of a loader that reads nothing (synthetic). A backend
    defines `batches_in(epoch)` and `_batches(position)` (the batches of `position.epoch` from `position.batch` on);
    iterating hands them out and moves the position."""

    bytes_read: int = 0  # compressed bytes read from shards, all epochs (a backend that reads adds to it)

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.position = Position()
        self.num_workers = spec.workers  # decode processes or threads actually used
        self.num_samples = 0  # the split's samples (a backend sets it)
        self.fingerprint: str | None = None  # its shards' digest (ShardSet.fingerprint); None: no shards read
        self._skipped: dict[str, int] = {}

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def skipped_shards(self) -> dict[str, int]:
        """on_error="skip": shard file name -> samples replaced there, all epochs."""
        return self._skipped

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration makes: the current one keeps its position (a resumed epoch goes on where it
        stands); another starts from its beginning. Optional: an epoch iterated to its end moves on to the next."""
        if epoch != self.position.epoch:
            self.position = Position(epoch)

    def batches_in(self, epoch: int | None = None) -> int:
        """The batches `epoch` has in this layout, equal on every rank (None: a whole epoch, as every epoch but a
        resumed one has; a resumed one counts the earlier layouts' too, `Position.offset`)."""
        raise NotImplementedError

    def __len__(self) -> int:
        """The current epoch's batches, `position.batch` of them handed out. After a resume on another layout both
        count on from the batches the earlier layouts handed out of it (`position.offset`), as StatefulDataLoader's
        do: its length is then those and the rest of the epoch in this layout."""
        return self.batches_in(self.position.epoch)

    def side_at(self, epoch: int) -> int:
        """The side of `epoch`'s images."""
        return self.spec.size_at(epoch)

    def __iter__(self) -> Iterator[Batch]:
        position, count = self.position, len(self)
        if position.batch >= count:  # an empty rest of an epoch (elastic): the next epoch follows
            self.position = Position(position.epoch + 1)
            return
        made = self._batches(position)
        for k in range(position.batch, count):
            images, labels = next(made)
            # Before the yield: a state taken while the consumer holds this batch counts it as handed out.
            self.position = Position(position.epoch, position.stages, k + 1) if k + 1 < count else \
                Position(position.epoch + 1)
            yield Batch(images, labels)

    def _batches(self, position: Position) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    # -- the position as plain data: torchdata's StatefulDataLoader protocol ---------------------------------------

    def state_dict(self) -> dict:
        """Where the loader stands after the last batch it handed out, as plain data (`torch.load(...,
        weights_only=True)` reads it): the position, the layout it was taken in, and what identifies the plan."""
        p, s = self.position, self.spec
        return {"format": STATE_FORMAT, "split": s.split, "epoch": p.epoch, "batch": p.batch,
                "stages": [[st.world_size, st.batch_size, st.steps_done] for st in p.stages],
                "world_size": s.world_size, "batch_size": s.batch_size, "repeats": s.repeats, "seed": s.seed,
                "shuffle_window": s.shuffle_window, "samples": self.num_samples, "shards": self.fingerprint,
                "side": self.side_at(p.epoch)}

    def load_state_dict(self, state: dict) -> None:
        """Stand where `state` (another loader's `state_dict()`, of any world size and batch size) stood: the next
        iteration yields the rest of its epoch, which ends where that epoch ends. On another layout that rest is
        the epoch's samples no layout has read yet (pipeline/plan.py rule 6). StateError, in one line, for a state
        that is not one, or (inside an epoch: at an epoch's start only the epoch counts) of another plan."""
        keys = set(self.state_dict()) - {"side"}
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not keys <= set(state):
            got = f"format {state.get('format')!r}" if isinstance(state, dict) else type(state).__name__
            missing = f" without {', '.join(sorted(keys - set(state)))}" if isinstance(state, dict) else ""
            raise StateError(f"loader state: {got}{missing}; this loader reads the state_dict() of format "
                             f"{STATE_FORMAT}")
        s = self.spec
        position = Position(state["epoch"], tuple(Stage(*st) for st in state["stages"]), state["batch"])
        inside = bool(position.batch or position.stages)
        said = {"split": lambda a, b: f"a state of the {a} split, this loader reads {b}",
                "seed": lambda a, b: f"taken with seed {a}, this loader's is {b}",
                "shuffle_window": lambda a, b: f"taken with shuffle_window {a}, this loader's is {b}",
                "shards": lambda a, b: f"taken on {f'shards {a}' if a else 'no shards (synthetic input)'}, this "
                                       f"loader reads {f'shards {b}' if b else 'none'} (another shard set)",
                "samples": lambda a, b: f"taken on {a} samples, this loader's split has {b}"}
        mine = {"split": s.split, "seed": s.seed, "shuffle_window": s.shuffle_window, "shards": self.fingerprint,
                "samples": self.num_samples}
        for key, here in mine.items():
            if state[key] != here and (inside or key == "split"):
                raise StateError(f"loader state: {said[key](state[key], here)}; the rest of an epoch continues "
                                 f"only the plan it was taken on (the same shard set, split, seed and window)")
        then, now = (state["world_size"], state["batch_size"]), (s.world_size, s.batch_size)
        if inside and (state["repeats"] != s.repeats or (s.repeats > 1 and then != now)):
            raise StateError(
                f"loader state: taken inside epoch {position.epoch} read with aug_repeats {state['repeats']} on "
                f"{then[0]} x {then[1]} (ranks x batch); such an epoch continues only as it was read (aug_repeats "
                f"{state['repeats']}, {then[0]} x {then[1]}): this loader is aug_repeats {s.repeats}, "
                f"{now[0]} x {now[1]}")
        before, self.position = self.position, continue_epoch(position, then, now)
        if self.position.batch > len(self):  # the epoch's length in the new position
            count, self.position = len(self), before
            raise StateError(f"loader state: batch {position.batch} of epoch {position.epoch}, which has {count} "
                             f"batches here")

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
