"""The reference the host backend is measured against: a stock torchvision `ImageFolder` + `DataLoader`, with the same
crop, flip and normalization as the contract, everything (decode, float conversion, normalize) in the workers on the
CPU. It is what most ImageNet scripts run, so `pipeline.bench --baseline` reports the ratio to it."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.contract import LoaderSpec, eval_resize


def baseline_transform(spec: LoaderSpec):
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    if spec.train:
        return T.Compose([T.RandomResizedCrop(spec.img_size, scale=spec.scale, ratio=spec.ratio),
                          T.RandomHorizontalFlip(spec.hflip), *normalize])
    resize = eval_resize(spec.img_size, spec.crop_pct)
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(spec.img_size),
                      *normalize])


class TorchvisionLoader:
    """ImageFolder(`source`/`split`) through a DataLoader; yields (images, labels) on `spec.device` like a backend.
    Single-rank and drop_last for train, as the usual scripts do."""

    def __init__(self, source: str | Path, spec: LoaderSpec):
        from torchvision.datasets import ImageFolder

        root = Path(source) / spec.split
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no ImageFolder split here (--baseline wants the folder that holds "
                                    f"train/ and val/)")
        self.spec = spec
        self.dataset = ImageFolder(str(root), transform=baseline_transform(spec))
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=spec.batch_size, shuffle=spec.train, drop_last=spec.train,
            num_workers=spec.workers, persistent_workers=True, generator=self.generator,
            pin_memory=spec.device.type != "cpu", prefetch_factor=max(1, spec.prefetch))

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.spec.seed + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield (images.to(self.spec.device, non_blocking=True), labels.to(self.spec.device, non_blocking=True))

    def close(self) -> None:
        # Persistent workers stop when the iterator that owns them is collected.
        self.loader = None

    def describe(self) -> str:
        return f"torchvision ImageFolder + DataLoader, {self.spec.workers} workers, float normalize on the CPU"
