"""The reference the host backend is measured against: a stock torchvision `ImageFolder` + `DataLoader`, with the
transform policy of `pipeline/transforms.py` (crop, flip, interpolation, normalization) as torchvision's own
operators, everything (decode, float conversion, normalize) in the workers on the CPU. It is what most ImageNet
scripts run, so `pipeline.bench --baseline` reports the ratio to it. With augmentation (--aa, --color-jitter) the
train transform is timm's own `create_transform`, what a timm user would otherwise run (for --aa ta_wide, which
timm lacks, torchvision's TrivialAugmentWide after the crop and flip)."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.loader import Loader, LoaderSpec
from pipeline.transforms import Transform


def baseline_transform(t: Transform):
    """The transform policy as torchvision's own operators: what a stock ImageNet script runs."""
    from torchvision import transforms as T

    interpolation = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[t.interpolation]
    normalize = [T.ToTensor(), T.Normalize(t.mean, t.std)]
    if t.train and t.augment.trivial:  # timm has no TrivialAugment: torchvision's, as its reference recipes run it
        return T.Compose([T.RandomResizedCrop(t.img_size, scale=t.scale, ratio=t.ratio, interpolation=interpolation),
                          T.RandomHorizontalFlip(t.hflip), T.TrivialAugmentWide(), *normalize])
    if t.train and t.augment.active:
        from timm.data import create_transform

        jitter = t.augment.color_jitter
        return create_transform(t.img_size, is_training=True, scale=t.scale, ratio=t.ratio, hflip=t.hflip,
                                auto_augment=t.augment.aa, color_jitter=jitter[:3] if jitter and not jitter[3]
                                else jitter, interpolation=t.interpolation, mean=t.mean, std=t.std)
    if t.train:
        return T.Compose([T.RandomResizedCrop(t.img_size, scale=t.scale, ratio=t.ratio, interpolation=interpolation),
                          T.RandomHorizontalFlip(t.hflip), *normalize])
    return T.Compose([T.Resize(t.eval_resize, interpolation=interpolation), T.CenterCrop(t.img_size), *normalize])


class TorchvisionLoader(Loader):
    """ImageFolder(`source`/`split`) through a DataLoader; yields (images, labels) on `spec.device` like a backend.
    Single-rank and drop_last for train, as the usual scripts do."""

    def __init__(self, source: str | Path, spec: LoaderSpec):
        from torchvision.datasets import ImageFolder

        root = Path(source) / spec.split
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no ImageFolder split here (--baseline wants the folder that holds "
                                    f"train/ and val/)")
        super().__init__(spec)
        self.dataset = ImageFolder(str(root), transform=baseline_transform(spec.transform))
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=spec.batch_size, shuffle=spec.train, drop_last=spec.train,
            num_workers=spec.workers, persistent_workers=True, generator=self.generator,
            pin_memory=spec.device.type != "cpu", prefetch_factor=max(1, spec.prefetch))
        self.steps = len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.generator.manual_seed(self.spec.seed + epoch)

    def batches_in(self, epoch: int | None = None) -> int:
        return self.steps

    def __iter__(self):  # whole epochs, as a DataLoader runs them: a benchmark's reference holds no position
        for images, labels in self.loader:
            yield (images.to(self.spec.device, non_blocking=True), labels.to(self.spec.device, non_blocking=True))

    def close(self) -> None:
        # Persistent workers stop when the iterator that owns them is collected.
        self.loader = None

    def describe(self) -> str:
        t = self.spec.transform
        transform = ("torchvision's transform + TrivialAugmentWide" if t.train and t.augment.trivial else
                     "timm's create_transform" if t.train and t.augment.active else "torchvision's transform")
        return f"torchvision ImageFolder + DataLoader, {transform}, {self.spec.workers} workers, float normalize on " \
               f"the CPU"
