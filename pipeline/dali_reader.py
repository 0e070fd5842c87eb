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
    """DALI's parallel external source for one loader: batch g of the pipeline's run is batch batches[g % n] of epoch
    first_epoch + g // n, n = len(batches) (plan rule 4), returned as (JPEG bytes per sample, int64 labels, the
    epoch's output side per sample as float32 (side, side)). The side is `schedule`'s for the epoch, or `img_size`
    without one (val, or a train run at one side); it travels with the batch, as an argument input of the resize, so
    a schedule changes it at the epoch boundary without a rebuild.
    Stateless per call, as DALI's workers require; it never ends, so DALI reads and decodes across epoch
    boundaries."""

    def __init__(self, planner: EpochPlanner, first_epoch: int, batches: list[int], num_classes: int | None,
                 img_size: int, schedule: ResSchedule | None = None):
        self.planner, self.first_epoch, self.batches, self.num_classes = planner, first_epoch, batches, num_classes
        self.img_size, self.schedule = img_size, schedule
        self.reader = ShardReader()

    def side(self, epoch: int) -> int:
        return self.schedule.size(epoch) if self.schedule is not None else self.img_size

    def __call__(self, info) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        n = len(self.batches)
        epoch, index = self.first_epoch + info.iteration // n, self.batches[info.iteration % n]
        samples = self.reader.read_batch(self.planner, epoch, index)
        jpegs, labels = [], np.full(len(samples), -1, np.int64)
        for i, sample in enumerate(samples):
            if sample is None:
                jpegs.append(padding_jpeg())
                continue
            labels[i] = usable_label(sample, self.num_classes)
            jpegs.append(np.frombuffer(sample.jpg, np.uint8))
        return jpegs, labels, np.full((len(samples), 2), self.side(epoch), np.float32)
