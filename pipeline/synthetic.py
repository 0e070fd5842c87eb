"""Random batches made once on the device: the input-free ceiling that every FPS figure is compared with."""
from __future__ import annotations

import torch

from pipeline.loader import Loader, LoaderSpec
from pipeline.plan import Position, rest_samples, steps_per_epoch
from pipeline.shards.format import open_shard_set
from pipeline.transforms import to_model_input

IMAGENET_SAMPLES = {"train": 1_281_167, "val": 50_000}


class SyntheticLoader(Loader):
    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        # With shards at hand the epoch has their length, so synthetic and real runs step the same; without, ImageNet's.
        self.num_samples = IMAGENET_SAMPLES[spec.split]
        if spec.data_path is not None:
            shard_set = spec.shards or open_shard_set(spec.data_path)
            self.num_samples = shard_set.manifest.splits[spec.split].num_samples
        g = torch.Generator().manual_seed(spec.seed + spec.rank)
        pixels = torch.randint(0, 256, (spec.batch_size, spec.img_size, spec.img_size, 3), dtype=torch.uint8,
                               generator=g)
        self.images = to_model_input(pixels.to(spec.device), spec, nhwc=True)
        self.labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g).to(spec.device)

    def batches_in(self, epoch: int | None = None) -> int:
        # The rest of an epoch resumed on another layout has the samples no layout read (pipeline/plan.py rule 6).
        stages = self.position.stages if epoch == self.position.epoch else ()
        s = self.spec
        steps = steps_per_epoch(rest_samples(self.num_samples, stages), s.batch_size, s.world_size, s.train,
                                s.repeats)
        return self.position.offset + steps if stages else max(1, steps)

    def _batches(self, position: Position):
        side = self.side_at(position.epoch)  # a schedule's smaller side: the batch's top-left corner
        images = self.images if side == self.spec.img_size else self.images[..., :side, :side].contiguous(
            memory_format=torch.channels_last if self.spec.channels_last else torch.contiguous_format)
        while True:
            yield images, self.labels

    def describe(self) -> str:
        return "synthetic (one random batch, resident on the device)"
