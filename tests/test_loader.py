"""pipeline/loader.py: the input-wait timer every timing loop shares, and backend options checked by type."""
from __future__ import annotations

import time

import pytest
import torch

from pipeline import build_loader, timed
from pipeline.backends import BACKENDS, get_backend
from pipeline.host import HostOptions
from pipeline.loader import EpochRun, Loader, LoaderSpec, ShardLoader


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


def test_an_epoch_run_follows_on_only_into_the_next_epoch_after_whole_epochs():
    run = EpochRun(train=True, steps=3)
    assert not run.follows(0)  # no run yet
    run.restart(4)
    run.taken = 2
    assert run.epoch == 4 and not run.follows(5)  # epoch 4 not all taken
    run.taken = 3
    assert run.epoch == 5 and run.follows(5) and not run.follows(6) and not run.follows(4)
    run.stop()
    assert not run.follows(5)
    val = EpochRun(train=False, steps=3)
    val.restart(0)
    val.taken = 3
    assert val.follows(7)  # val reads the same batches every epoch


def test_backends_come_from_one_registry():
    assert BACKENDS == ("host", "dali", "hybrid", "synthetic")
    assert get_backend("host").options_class() is HostOptions and get_backend("synthetic").options_class() is None
    assert [n for n in BACKENDS if not get_backend(n).reads_shards] == ["synthetic"]
    with pytest.raises(ValueError, match=r"backend must be one of \('host', 'dali', 'hybrid', 'synthetic'\), "
                                         r"got 'gpu'"):
        build_loader(backend="gpu", batch_size=4, device="cpu")
    with build_loader(backend="synthetic", batch_size=2, device="cpu", img_size=8, num_classes=3) as loader:
        assert isinstance(loader, Loader) and loader.bytes_read == 0 and loader.skipped_shards == {}
        assert loader.describe().startswith("synthetic") and loader.num_workers == 4


class FlakyStart(ShardLoader):
    """Its producers fail to start once; after that each batch is its step number."""

    def __init__(self, spec):
        super().__init__(spec, "test")
        self.starts, self.fail = [], True
        self.closed = 0

    def start_run(self, epoch):
        self.starts.append(epoch)
        if self.fail:
            self.fail = False
            raise OSError("no producers")

    def take(self, step):
        return step

    def close(self):
        self.closed += 1
        self.run.stop()


def test_a_run_that_fails_to_start_closes_and_the_next_iteration_starts_it_again(sample_shards):
    spec = LoaderSpec(data_path=str(sample_shards), split="train", batch_size=4, device=torch.device("cpu"))
    loader = FlakyStart(spec)
    with pytest.raises(OSError, match="no producers"):
        next(iter(loader))
    assert loader.closed == 1 and loader.starts == [0]
    assert list(loader) == list(range(len(loader)))  # started anew, not taken as following on
    assert loader.starts == [0, 0]
    loader.set_epoch(1)
    assert list(loader) == list(range(len(loader))) and loader.starts == [0, 0]  # whole epoch taken: ran on
