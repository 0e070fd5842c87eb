"""Batch augmentation on the device, after the transfer, in the step's stream: random erasing (--reprob), then mixup
and cutmix (--mixup, --cutmix) with their soft targets. timm's recipes with timm's draws: `RandomErasing` and `Mixup`
here draw the same numbers in the same order as timm.data.RandomErasing and timm.data.Mixup from generators of the
same kinds, so seeded alike they erase the same boxes and mix with the same weights (tests/test_batch_augment.py).

Why not timm's classes themselves: their per-sample modes (random erasing, --mixup-mode elem or pair) loop over the
batch in Python, a few small device ops per sample (about a thousand kernel launches per step at batch 256), and
they draw from the process-global numpy and python streams. Here the host draws a batch's numbers from generators of
this object's own (their states go into checkpoints, so a resume is exact), and the device applies all of a batch's
boxes and weights in a few whole-batch masked ops. Nothing waits for the device: the draws never read it, and they
reach it as one small copy per step.

Pixel input (uint8 batches with the normalization folded into the model, model/fused.py): erasing writes
255 * (mean + std * z) for timm's normalized fill z and mixup blends the pixels, in float32 and unrounded, so the
model computes what timm's computes on the normalized batch. Cutmix alone only copies pixels: the batch stays uint8.
"""
from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch

from trainlib import checkpoint
from trainlib.config import TrainConfig


class RandomErasing:
    """timm's RandomErasing(probability, mode, max_count) on a whole batch (its defaults: erased area 2%..1/3 of the
    image, aspect 0.3..1/0.3, up to 10 tries per box). `pixels`: the batch holds 0..255 pixels of the given
    mean/std (0..1 scale), else normalized values."""

    def __init__(self, probability: float, mode: str, max_count: int, *, mean, std, pixels: bool,
                 rng: random.Random, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        self.probability, self.mode, self.max_count, self.rng = probability, mode, max_count, rng
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.mean, self.std, self.pixels = tuple(mean), tuple(std), pixels

    def boxes(self, batch_size: int, height: int, width: int) -> np.ndarray:
        """(batch, max_count, 4) int: top, height, left, width of each box, in timm's draw order; unused rows 0."""
        out = np.zeros((batch_size, self.max_count, 4), dtype=np.int64)
        rng, area = self.rng, height * width
        for i in range(batch_size):
            if rng.random() > self.probability:
                continue
            count = 1 if self.max_count == 1 else rng.randint(1, self.max_count)
            for k in range(count):
                for _ in range(10):
                    target_area = rng.uniform(self.min_area, self.max_area) * area / count
                    aspect = math.exp(rng.uniform(*self.log_aspect))
                    h = int(round(math.sqrt(target_area * aspect)))
                    w = int(round(math.sqrt(target_area / aspect)))
                    if w < width and h < height:
                        out[i, k] = rng.randint(0, height - h), h, rng.randint(0, width - w), w
                        break
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        boxes = to_device(self.boxes(b, h, w), images.device)
        covered = box_masks(boxes, h, w)  # (B, K, H, W)
        # The last box covering a pixel fills it (timm erases the boxes one after another); 0: none.
        index = torch.arange(1, self.max_count + 1, dtype=torch.int16, device=images.device).view(1, -1, 1, 1)
        last = (covered * index).amax(1)
        dtype = torch.float32 if self.pixels else images.dtype
        if self.mode == "pixel":
            fill = torch.randn_like(images, dtype=dtype)  # the batch's memory format (channels_last) kept
        elif self.mode == "rand":
            colours = torch.randn((b, self.max_count, c), dtype=dtype, device=images.device)
            colours = torch.cat([colours.new_zeros(b, 1, c), colours], 1)
            fill = colours[torch.arange(b, device=images.device).view(b, 1, 1), last.long()].permute(0, 3, 1, 2)
        else:
            fill = torch.zeros((b, c, 1, 1), dtype=dtype, device=images.device)
        if self.pixels:
            fill = self.to_pixels(fill)
        return torch.where((last > 0).unsqueeze(1), fill, images.to(dtype))

    def to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        shift, scale = pixel_constants(self.mean, self.std, z.device)
        return z * scale + shift


class Mixup:
    """timm's Mixup(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam=True,
    label_smoothing, num_classes) on a batch: sample i is mixed with sample B-1-i (the batch's mirror image); the
    targets are the smoothed one-hot labels mixed by the same weights, each row summing to one."""

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, cutmix_minmax, prob: float, switch_prob: float,
                 mode: str, label_smoothing: float, num_classes: int, rng: np.random.RandomState):
        self.mixup_alpha, self.cutmix_minmax = mixup_alpha, cutmix_minmax
        self.cutmix_alpha = 1.0 if cutmix_minmax is not None else cutmix_alpha  # timm: minmax forces alpha 1
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.label_smoothing, self.num_classes, self.rng = label_smoothing, num_classes, rng
        self.enabled = True  # off from --mixup-off-epoch

    # -- the draws, in timm's order ------------------------------------------------------------------------------

    def _lam_and_cutmix(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """timm's _params_per_elem: per-element weights (1 = not mixed) and which of them cut."""
        rng = self.rng
        lam, cut = np.ones(n, dtype=np.float32), np.zeros(n, dtype=bool)
        if not self.enabled:
            return lam, cut
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = rng.rand(n) < self.switch_prob
            lam_mix = np.where(cut, rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=n),
                               rng.beta(self.mixup_alpha, self.mixup_alpha, size=n))
        elif self.mixup_alpha > 0:
            lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, size=n)
        else:
            cut = np.ones(n, dtype=bool)
            lam_mix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=n)
        return np.where(rng.rand(n) < self.prob, lam_mix.astype(np.float32), lam), cut

    def _batch_lam_and_cutmix(self) -> tuple[float, bool]:
        """timm's _params_per_batch."""
        rng, lam, cut = self.rng, 1.0, False
        if self.enabled and rng.rand() < self.prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                cut = rng.rand() < self.switch_prob
                alpha = self.cutmix_alpha if cut else self.mixup_alpha
            elif self.mixup_alpha > 0:
                alpha = self.mixup_alpha
            else:
                cut, alpha = True, self.cutmix_alpha
            lam = float(rng.beta(alpha, alpha))
        return lam, cut

    def _box(self, lam: float, height: int, width: int) -> tuple[tuple[int, int, int, int], float]:
        """timm's cutmix_bbox_and_lam with correct_lam: (top, bottom, left, right), the weight of the kept image."""
        rng = self.rng
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            cut_h = rng.randint(int(height * lo), int(height * hi))
            cut_w = rng.randint(int(width * lo), int(width * hi))
            top, left = rng.randint(0, height - cut_h + 1), rng.randint(0, width - cut_w + 1)
            bottom, right = top + cut_h, left + cut_w
        else:
            ratio = np.sqrt(1 - lam)
            cut_h, cut_w = int(height * ratio), int(width * ratio)
            cy, cx = rng.randint(0, height), rng.randint(0, width)
            top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
            left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
        box = int(top), int(bottom), int(left), int(right)
        return box, 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(height * width)

    def params(self, batch_size: int, height: int, width: int) -> np.ndarray:
        """(batch, 6) float32 per sample: blend weight (1 = none), cut flag, top, bottom, left, right; and column 6,
        the target weight of the sample's own label. Batch mode repeats one row."""
        rows = np.zeros((batch_size, 7), dtype=np.float32)
        rows[:, 0] = rows[:, 6] = 1.0
        if self.mode == "batch":
            lam, cut = self._batch_lam_and_cutmix()
            if lam != 1.0:
                if cut:
                    box, lam = self._box(lam, height, width)
                    rows[:, 1], rows[:, 2:6] = 1, box
                else:
                    rows[:, 0] = lam
                rows[:, 6] = lam
            return rows
        n = batch_size // 2 if self.mode == "pair" else batch_size
        lam, cut = self._lam_and_cutmix(n)
        for i in range(n):
            if lam[i] != 1.0:
                if cut[i]:
                    box, lam[i] = self._box(lam[i], height, width)
                    rows[i, 1], rows[i, 2:6] = 1, box
                else:
                    rows[i, 0] = lam[i]
        rows[:n, 6] = lam
        if self.mode == "pair":  # sample B-1-i takes pair i's draw
            rows[n:] = rows[:n][::-1]
        return rows

    # -- the device side -----------------------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = images.shape
        p = to_device(self.params(b, h, w), images.device)
        mirror = images.flip(0)
        if self.mixup_alpha > 0:  # blending: float (pixels unrounded)
            # In float32 whatever the batch's dtype: a bf16 weight would round lam to 8 bits, away from the
            # targets' weight. Pixels stay float32 (unrounded); a 16-bit batch goes back to its dtype.
            dtype = images.dtype if images.is_floating_point() else torch.float32
            weight = p[:, 0].view(b, 1, 1, 1)
            images = (images.float() * weight + mirror.float() * (1 - weight)).to(dtype)
            mirror = mirror.to(dtype)
        if self.cutmix_alpha > 0:
            cut = box_masks(p[:, 2:6].long().view(b, 1, 4), h, w, corners=True)
            cut &= p[:, 1].bool().view(b, 1, 1, 1)
            images = torch.where(cut, mirror, images)
        return images, self.targets(labels, p[:, 6:7])

    def targets(self, labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """timm's mixup_target: smoothed one-hot rows, each mixed with its mirror's by the sample's weight."""
        off = self.label_smoothing / self.num_classes
        one_hot = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        one_hot.scatter_(1, labels.long().view(-1, 1), 1.0 - self.label_smoothing + off)
        return one_hot * lam + one_hot.flip(0) * (1.0 - lam)


@functools.lru_cache(maxsize=8)
def pixel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """255 * mean and 255 * std as (1, C, 1, 1) float32 on the device, made once: building them per step from host
    values would be a blocking copy, a sync in every step."""
    shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).mul(255).to(device)
    scale = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).mul(255).to(device)
    return shift, scale


def box_masks(boxes: torch.Tensor, height: int, width: int, corners: bool = False) -> torch.Tensor:
    """(B, K, H, W) bool from (B, K, 4) boxes: top, height, left, width (or with `corners`: top, bottom, left,
    right); a box of height 0 covers nothing."""
    top, second, left, fourth = boxes.unbind(-1)
    bottom, right = (second, fourth) if corners else (top + second, left + fourth)
    ys = torch.arange(height, device=boxes.device).view(1, 1, -1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, -1)
    rows = (ys >= top.unsqueeze(-1)) & (ys < bottom.unsqueeze(-1))
    cols = (xs >= left.unsqueeze(-1)) & (xs < right.unsqueeze(-1))
    return rows.unsqueeze(-1) & cols.unsqueeze(-2)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array of draws on the device without waiting for it (a copy queued in the current stream); on the CPU
    the array itself."""
    return host_source(array, device).to(device, non_blocking=True)


def host_source(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """What `to_device` copies from: for an accelerator (cuda, npu) a page-locked copy of the array. From pageable
    memory the driver stages a non_blocking copy itself and may first wait for the stream (a sync per step); from
    page-locked memory it is one DMA queued behind the step. torch's caching host allocator keeps the block until
    that copy has run, so the next step's draws never overwrite it early."""
    source = torch.from_numpy(array)
    return source if device.type == "cpu" else source.pin_memory()


class BatchAugment:
    """Random erasing then mixup/cutmix, as timm's loader and train loop apply them, with the generators' state for
    checkpoints. `__call__(images, labels)` -> (images, targets): targets are the labels unless mixing is on, then
    soft rows (batch, classes)."""

    def __init__(self, erasing: RandomErasing | None, mixup: Mixup | None, mixup_off_epoch: int = 0):
        self.erasing, self.mixup, self.mixup_off_epoch = erasing, mixup, mixup_off_epoch

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, num_classes: int, mean, std, pixels: bool, seed: int):
        """The run's batch augmentation (None when the flags turn none on). `seed`: this rank's."""
        erasing = mixup = None
        if cfg.reprob > 0:
            erasing = RandomErasing(cfg.reprob, cfg.remode, cfg.recount, mean=mean, std=std, pixels=pixels,
                                    rng=random.Random(seed))
        if cfg.mixing:
            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                          prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                          label_smoothing=cfg.label_smoothing, num_classes=num_classes,
                          rng=np.random.RandomState(seed % 2**32))
        return cls(erasing, mixup, cfg.mixup_off_epoch) if erasing or mixup else None

    def set_epoch(self, epoch: int) -> None:
        if self.mixup is not None:
            self.mixup.enabled = not (self.mixup_off_epoch and epoch >= self.mixup_off_epoch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erasing is not None:
            images = self.erasing(images)
        if self.mixup is not None:
            return self.mixup(images, labels)
        return images, labels

    def reseed(self, seed: int) -> None:
        """Fresh streams (an elastic resume, which cannot repeat an uninterrupted run anyway)."""
        if self.erasing is not None:
            self.erasing.rng.seed(seed)
        if self.mixup is not None:
            self.mixup.rng.seed(seed % 2**32)

    def state_dict(self) -> dict:
        """The generators' states, in weights_only-loadable types."""
        state = {}
        if self.erasing is not None:
            state["erasing"] = checkpoint.python_state(self.erasing.rng)
        if self.mixup is not None:
            state["mixup"] = checkpoint.numpy_state(self.mixup.rng)
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.erasing is not None and "erasing" in state:
            checkpoint.set_python_state(state["erasing"], self.erasing.rng)
        if self.mixup is not None and "mixup" in state:
            checkpoint.set_numpy_state(state["mixup"], self.mixup.rng)
