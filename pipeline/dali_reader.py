"""What DALI's reader processes run: `BatchSource`, the parallel external source of the dali backend.

Torch-free on purpose. Where DALI spawns its readers (always beside a GPU or an NPU, pipeline/dali.py
`reader_start_method`), each reader unpickles the source and so imports the module that defines it and what that
imports; from pipeline/dali.py that was torch, about 2 s and 0.8 GB per reader (docs/dali.md, "Reader
processes"). Here a reader imports numpy, Pillow (for the padding JPEG) and the shard reader.
"""
from __future__ import annotations

import functools
import io

import numpy as np

from pipeline.plan import EpochPlanner
from pipeline.resolution import ResSchedule
from pipeline.shards.reader import ShardReader, usable_label


@functools.lru_cache(maxsize=1)
def padding_jpeg() -> np.ndarray:
    """A small valid JPEG that stands in for val padding samples (label -1, which metrics skip)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(out, "JPEG")
    return np.frombuffer(out.getvalue(), np.uint8)


class BatchSource:
    """DALI's parallel external source for one loader: the pipeline's run makes rank-local batches `first` of epoch
    `first_epoch` (the rest of it from the loader's position), then batches `whole` of each epoch after (plan rule
    4), each returned as (JPEG bytes per sample, int64 labels, the epoch's output side per sample as float32 (side,
    side)). The side is `schedule`'s for the epoch, or `img_size` without one (val, or a train run at one side); it
    travels with the batch, as an argument input of the resize, so a schedule changes it at the epoch boundary
    without a rebuild. `planner` holds the plan of `first_epoch` (that of a resumed one, pipeline/plan.py rule 6).
    Stateless per call, as DALI's workers require; it never ends, so DALI reads and decodes across epoch
    boundaries."""

    def __init__(self, planner: EpochPlanner, first_epoch: int, first: list[int], whole: list[int],
                 num_classes: int | None, img_size: int, schedule: ResSchedule | None = None):
        self.planner, self.first_epoch, self.num_classes = planner, first_epoch, num_classes
        self.first, self.whole = first, whole
        self.img_size, self.schedule = img_size, schedule
        self.reader = ShardReader()

    def side(self, epoch: int) -> int:
        return self.schedule.size(epoch) if self.schedule is not None else self.img_size

    def batch(self, iteration: int) -> tuple[int, int]:
        """(epoch, rank-local batch index) of the run's `iteration`-th batch."""
        if iteration < len(self.first):
            return self.first_epoch, self.first[iteration]
        later = iteration - len(self.first)
        return self.first_epoch + 1 + later // len(self.whole), self.whole[later % len(self.whole)]

    def __call__(self, info) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        epoch, index = self.batch(info.iteration)
        samples = self.reader.read_batch(self.planner, epoch, index)
        jpegs, labels = [], np.full(len(samples), -1, np.int64)
        for i, sample in enumerate(samples):
            if sample is None:
                jpegs.append(padding_jpeg())
                continue
            labels[i] = usable_label(sample, self.num_classes)
            jpegs.append(np.frombuffer(sample.jpg, np.uint8))
        return jpegs, labels, np.full((len(samples), 2), self.side(epoch), np.float32)
