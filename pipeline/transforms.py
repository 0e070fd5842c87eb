"""The transform policy, in one place: what a sample's pixels go through between the shard and the model, for train
and for eval. Every decoder follows it: the host workers call it (`Transform.crop_box`, `rgb_into`), the DALI graph
(`pipeline/dali.py`) and the torchvision baseline (`pipeline/bench/baseline.py`) build their operators from the same
`Transform`, and every backend ends with `to_model_input`.

  train  RandomResizedCrop(scale, ratio) box of the source, resized bilinear to img_size, flipped with p = hflip
         (torchvision's train transform), then `augment` on the tile (pipeline/augment.py: --aa, --color-jitter,
         where timm applies them);
  eval   timm's eval transform: the shorter side resized to floor(img_size / crop_pct), the central img_size square,
         bicubic; computed as one box of the source and one resize, so a decoder crops first;
  model  uint8 NHWC pixels -> NCHW, normalized with mean/std (or raw 0..255 for a model that folds normalization into
         its patch embedding), in the dtype and memory format the spec asks for.

The geometry is torch-free, so a host worker imports no torch; `to_model_input` imports it when first called.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.augment import Augment
from pipeline.processes import keep_freed_memory_in_the_heap

if TYPE_CHECKING:
    import torch

try:
    from pipeline import _pixels
except ImportError:  # not built (no C compiler at install): Pillow flips and packs, torch converts in three passes
    _pixels = None

PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class Transform:
    """One split's policy, the one description every decoder follows (`LoaderSpec.transform` makes it)."""

    train: bool
    img_size: int
    scale: tuple[float, float] = (0.08, 1.0)  # train: RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # train: RandomResizedCrop aspect range
    hflip: float = 0.5  # train: probability of a horizontal flip
    crop_pct: float = 0.9  # eval: resize to img_size / crop_pct, then center crop
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # timm's ViT-B/32 normalization
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: Augment = Augment()  # train: per-sample ops on the output tile (none by default)

    @property
    def interpolation(self) -> str:
        return "bilinear" if self.train else "bicubic"  # torchvision's train transform / timm's ViT eval transform

    @property
    def eval_resize(self) -> int:
        return eval_resize(self.img_size, self.crop_pct)

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
        """(left, top, w, h) in source pixels of what becomes the output image; train draws from `rng`."""
        if self.train:
            return random_resized_crop(width, height, rng, self.scale, self.ratio)
        return center_crop_box(width, height, self.img_size, self.crop_pct)

    def flips(self, rng: random.Random) -> bool:
        """Whether this sample is mirrored; drawn after its crop box (eval draws nothing)."""
        return self.train and rng.random() < self.hflip


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


def rgb_into(image: Image.Image, out: np.ndarray, flip: bool = False) -> None:
    """The pixels of an RGB or RGBX image, mirrored left to right when `flip`, into `out` (height, width, 3) uint8."""
    if image.mode in ("RGB", "RGBX") and _pixels is not None:
        # Pillow holds both modes as 4 bytes a pixel, so their RGBX rows come out as a plain copy; one pass of
        # pipeline/_pixels.c then drops the fourth byte (and mirrors), where Pillow would copy a mirrored image and
        # pack its rows to RGB in a slower pass (docs/pipeline.md, "The host backend").
        _pixels.rgb_rows(image.tobytes("raw", "RGBX"), out, image.size[0], flip)
        return
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # cheaper than numpy's reversed-stride copy
    out[...] = np.frombuffer(image.tobytes("raw", "RGB"), np.uint8).reshape(out.shape)


@functools.lru_cache(maxsize=16)
def _norm_constants(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: building them per batch is a blocking host-to-device copy, a full sync each step."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
    s = 1 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
    return m.to(device), s.to(device)


def to_model_input(images_u8: torch.Tensor, spec, nhwc: bool) -> torch.Tensor:
    """uint8 pixels (already on the device) -> the images a loader yields, as `spec` (a `LoaderSpec`: dtype, mean,
    std, channels_last) asks. Runs on the device so the host ships 1 byte per pixel and the float work costs the
    accelerator a few elementwise kernels."""
    import torch  # here: the host workers import this module for its geometry and stay torch-free

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


def _one_pass_on_cpu(images_u8: torch.Tensor, spec) -> torch.Tensor | None:
    """A CPU batch of NHWC pixels in the loader's layout, float32 or uint8, by one pass of pipeline/_pixels.c
    instead of torch's three: the same bits as the chain in `to_model_input` (docs/pipeline.md, "The host backend").
    None where it does not apply: not built, not on the CPU, or a uint8 channels_last batch (a view is all it takes)."""
    import torch

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
