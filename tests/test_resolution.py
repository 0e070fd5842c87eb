"""pipeline/resolution.py: the train side per epoch, as FFCV's ImageNet example computes it."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.resolution import ResSchedule, ScheduleError


def ffcv_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int) -> int:
    """FFCV's examples/imagenet `get_resolution`, written out from its documented rule."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize("args", [(160, 192, 65, 76), (160, 256, 10, 30), (128, 224, 0, 7), (96, 96, 3, 3)])
def test_the_sides_are_ffcvs(args):
    schedule = ResSchedule(*args, step=32)
    schedule.validate()
    assert schedule.sizes(90) == [ffcv_resolution(e, *args) for e in range(90)]


def test_a_finer_step_gives_a_finer_ramp():
    assert ResSchedule(32, 64, 0, 4, step=8).sizes(6) == [32, 40, 48, 56, 64, 64]


def test_describe_names_each_side_and_its_epochs():
    assert ResSchedule(64, 128, 2, 4, step=32).describe(8) == "64 px (epochs 0-2), 96 (epoch 3), 128 (epochs 4-7)"


@pytest.mark.parametrize("args, message", [
    ((192, 160, 0, 5), "--min-res 192 is above --max-res 160"),
    ((100, 192, 0, 5), "--min-res 100 is not a multiple of 32"),
    ((160, 200, 0, 5), "--max-res 200 is not a multiple of 32"),
    ((160, 192, 6, 5), "--start-ramp 6 and --end-ramp 5"),
    ((0, 192, 0, 5), "--min-res must be >= 1"),
])
def test_a_schedule_that_cannot_work_names_its_flag(args, message):
    with pytest.raises(ScheduleError, match=message):
        ResSchedule(*args, step=32).validate()
