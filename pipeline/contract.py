"""The one contract every backend honours, and the pieces of it they share.

A loader is built from a `LoaderSpec`; it has `set_epoch(e)`, `len()` (steps per epoch, equal on every rank),
`close()`, and iterates `(images, labels)` already on `spec.device`:
  images  NCHW, `spec.dtype`; normalized with the model's mean/std, or raw 0..255 when `spec.dtype` is torch.uint8
          (for a model that folds normalization into its patch embedding);
  labels  int64; -1 marks val padding samples that metrics must skip.
Train batches are RandomResizedCrop(scale, ratio) + horizontal flip; val batches are timm's eval transform (resize
the shorter side to floor(img_size / crop_pct), center crop).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from pipeline.format import Shard
from pipeline.plan import EpochPlanner, Stage, share_of

try:
    from pipeline import _pixels
except ImportError:  # not built (no C compiler at install): torch converts CPU batches, in three passes
    _pixels = None

BACKENDS = ("host", "dali", "hybrid", "synthetic")
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
    img_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # timm's ViT-B/32 normalization
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.9  # val: resize to img_size / crop_pct, then center crop
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5
    dtype: torch.dtype = torch.float32  # torch.uint8: unnormalized pixels
    channels_last: bool = False
    prefetch: int = 2  # batches in flight ahead of the consumer
    shuffle_window: int = 4096  # train: samples permuted together (pipeline/plan.py rule 4), about 4 ImageNet shards
    on_error: str = "raise"  # "raise": a bad sample stops the run naming shard and key; "skip": count, replace
    num_classes: int = IMAGENET_CLASSES  # synthetic labels
    options: object = None  # the backend's own typed options (pipeline.host.HostOptions, pipeline.dali.DaliOptions);
    # None = that backend's defaults
    part: tuple[float, int] | None = None  # (share, 0 or 1): make only that part of each epoch's batches (hybrid)
    resumed_epoch: int | None = None  # train: the epoch an elastic resume continues (pipeline/plan.py rule 6); the
    stages: tuple[Stage, ...] = ()  # layouts that ran part of it. The loader's length is that epoch's rest.

    @property
    def train(self) -> bool:
        return self.split == "train"

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

    def backend_options(self, cls):
        """This spec's options for the backend whose options class is `cls`: checked, defaults when None."""
        opts = cls() if self.options is None else self.options
        if not isinstance(opts, cls):
            raise TypeError(f"options for this backend are a {cls.__name__}, got {type(opts).__name__}")
        opts.validate()
        return opts

    def batches(self, steps: int) -> list[int]:
        """The rank-local batch indices this loader makes each epoch: all of them, or its part (hybrid)."""
        return list(range(steps)) if self.part is None else share_of(steps, *self.part)

    def planner(self, shards: list[Shard]) -> EpochPlanner:
        """The epoch/rank plan of this rank over `shards` (pipeline/plan.py)."""
        return EpochPlanner(tuple(shards), self.train, self.batch_size, self.rank, self.world_size, self.seed,
                            self.shuffle_window, self.resumed_epoch, tuple(self.stages))


class Loader(Protocol):
    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def close(self) -> None: ...


def endless(loader: Loader, stride: int = 1):
    """Batches from epoch 0, stride, 2*stride, ... back to back: for benchmarks that run by the clock, not by epochs.
    A stride above 1 makes every epoch a jump, which a loader cannot run on into."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += stride


@contextlib.contextmanager
def main_not_replayed():
    """Start processes (spawn, forkserver) without them running the user's `__main__` again. multiprocessing hands a
    new interpreter the main script's path or module name, and the child runs it, unguarded top-level code included:
    a quick script without `if __name__ == "__main__":` would then build loaders inside every worker. Our workers'
    code lives in importable modules and needs nothing of the main script, so the main module's path and spec are
    hidden while the processes start, and restored after."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


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


def eval_resize(img_size: int, crop_pct: float) -> int:
    """Shorter-side length before the center crop, as timm's eval transform computes it."""
    return math.floor(img_size / crop_pct)


def random_resized_crop(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop box, torchvision's algorithm: 10 tries at a random area and
    log-uniform aspect ratio, then the whole image clamped to the ratio range."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, img_size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """(left, top, w, h) in source pixels of the region that timm's eval transform keeps: after resizing the shorter
    side to eval_resize(), the central img_size square. Lets a decoder crop first and resize once."""
    side = eval_resize(img_size, crop_pct)
    s = side / min(width, height)  # resize factor
    crop = img_size / s  # the kept square, in source pixels
    return (width - crop) / 2, (height - crop) / 2, crop, crop


@functools.lru_cache(maxsize=16)
def _norm_constants(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: building them per batch is a blocking host-to-device copy, a full sync each step."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
    s = 1 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
    return m.to(device), s.to(device)


@functools.cache
def keep_freed_memory_in_the_heap() -> None:
    """glibc hands freed blocks of more than 128 KB back to the kernel (and trims a thread's heap when its top is
    free), so the next allocation is fresh pages that the kernel zero-fills on first touch. A float batch on the CPU
    is such a block (38.5 MB at 64 x 224 px), every batch; in a host worker, the shard bytes its read-ahead thread
    reads are (docs/pipeline.md, "Measured figures"). Raising glibc's mmap and trim thresholds keeps freed memory in
    the heap for the next batch, as jemalloc or tcmalloc would. Process-wide, once: on the first CPU batch, and at a
    host worker's start; nothing happens where there is no glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


def to_model_input(images_u8: torch.Tensor, spec: LoaderSpec, nhwc: bool) -> torch.Tensor:
    """uint8 pixels (already on the device) -> the contract's images. Runs on the device so the host ships 1 byte per
    pixel and the float work costs the accelerator a few elementwise kernels."""
    if images_u8.device.type == "cpu":
        keep_freed_memory_in_the_heap()
    if nhwc and (out := _one_pass_on_cpu(images_u8, spec)) is not None:
        return out if out.dtype == spec.dtype else out.to(spec.dtype)
    x = images_u8.permute(0, 3, 1, 2) if nhwc else images_u8  # an NHWC tensor viewed as NCHW is channels_last
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    if spec.dtype == torch.uint8:
        return x.contiguous(memory_format=fmt)
    mean, inv_std = _norm_constants(x.device, tuple(spec.mean), tuple(spec.std))
    # One copy does layout and uint8 -> float together, then two in-place ops: three kernels and no temporaries,
    # where the out-of-place chain allocates and walks a float tensor per op. The arithmetic stays float32 whatever
    # the output dtype.
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    out.copy_(x).sub_(mean).mul_(inv_std)
    return out if spec.dtype == torch.float32 else out.to(spec.dtype)


def _one_pass_on_cpu(images_u8: torch.Tensor, spec: LoaderSpec) -> torch.Tensor | None:
    """A CPU batch of NHWC pixels in the contract's layout, float32 or uint8, by one pass of pipeline/_pixels.c
    instead of torch's three: the same bits as the chain in `to_model_input` (docs/pipeline.md, "The host backend").
    None where it does not apply: not built, not on the CPU, or a uint8 channels_last batch (a view is all it takes)."""
    if _pixels is None or images_u8.device.type != "cpu" or not images_u8.is_contiguous():
        return None
    n, h, w, _ = images_u8.shape
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    if spec.dtype == torch.uint8:
        if spec.channels_last:
            return None
        out = torch.empty((n, 3, h, w), dtype=torch.uint8)
        _pixels.planar(images_u8.numpy(), out.numpy(), h * w)
        return out
    mean, inv_std = _norm_constants(images_u8.device, tuple(spec.mean), tuple(spec.std))
    out = torch.empty((n, 3, h, w), dtype=torch.float32, memory_format=fmt)
    rows = out.permute(0, 2, 3, 1) if spec.channels_last else out  # the memory order, as a C-contiguous view
    _pixels.normalize(images_u8.numpy(), rows.numpy(), h * w, mean.view(3).tolist(), inv_std.view(3).tolist(),
                      not spec.channels_last)
    return out
