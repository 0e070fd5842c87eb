"""Random batches made once on the device: the input-free ceiling that every FPS figure is compared with."""
from __future__ import annotations

import torch

from pipeline.loader import Loader, LoaderSpec
from pipeline.plan import steps_per_epoch
from pipeline.shards.format import read_manifest
from pipeline.transforms import to_model_input

IMAGENET_SAMPLES = {"train": 1_281_167, "val": 50_000}


class SyntheticLoader(Loader):
    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        # With shards at hand the epoch has their length, so synthetic and real runs step the same; without, ImageNet's.
        num = IMAGENET_SAMPLES[spec.split]
        if spec.data_path is not None:
            num = read_manifest(spec.data_path).splits[spec.split].num_samples
        self.steps = max(1, steps_per_epoch(num, spec.batch_size, spec.world_size, spec.train, spec.aug_repeats))
        g = torch.Generator().manual_seed(spec.seed + spec.rank)
        pixels = torch.randint(0, 256, (spec.batch_size, spec.img_size, spec.img_size, 3), dtype=torch.uint8,
                               generator=g)
        self.images = to_model_input(pixels.to(spec.device), spec, nhwc=True)
        self.labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g).to(spec.device)

    def __iter__(self):
        side = self.spec.size_at(self.epoch)  # a schedule's smaller side: the batch's top-left corner
        images = self.images if side == self.spec.img_size else self.images[..., :side, :side].contiguous(
            memory_format=torch.channels_last if self.spec.channels_last else torch.contiguous_format)
        for _ in range(self.steps):
            yield images, self.labels

    def describe(self) -> str:
        return "synthetic (one random batch, resident on the device)"
