"""pipeline/loader.py: the input-wait timer every timing loop shares, and backend options checked by type."""
from __future__ import annotations

import time

import pytest
import torch

from pipeline import build_loader, timed
from pipeline.host import HostOptions


def test_timed_reports_the_time_blocked_in_next():
    def slow():
        for i in range(3):
            time.sleep(0.05 * i)
            yield i

    out = list(timed(slow()))
    assert [b for b, _ in out] == [0, 1, 2]
    waits = [w for _, w in out]
    assert waits[0] < 0.04 and 0.04 <= waits[1] < 0.5 and 0.09 <= waits[2] < 0.5


def test_host_options_are_checked(sample_shards):
    with pytest.raises(ValueError, match="slots_per_worker must be >= 1"):
        build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu",
                     options=HostOptions(slots_per_worker=0))
    with pytest.raises(TypeError, match="a HostOptions, got dict"):
        build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu", options={"timeout_s": 1})
    with build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu", workers=1, img_size=16,
                      dtype=torch.uint8, options=HostOptions(slots_per_worker=1, start_method="spawn")) as loader:
        assert "1 shm slots" in loader.describe() and "(spawn)" in loader.describe()
        assert sum(len(y) for _, y in loader) == len(loader) * 4
