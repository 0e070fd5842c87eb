"""pipeline/loader.py: the input-wait timer every timing loop shares, and backend options checked by type."""
from __future__ import annotations

import time

import pytest
import torch

from pipeline import build_loader, timed
from pipeline.backends import BACKENDS, get_backend
from pipeline.host import HostOptions
from pipeline.loader import Loader, LoaderSpec
from pipeline.shard_loader import EpochRun, ShardLoader
from pipeline.plan import Position


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


def test_an_epoch_run_follows_on_only_from_the_position_its_producers_stand_at():
    run = EpochRun(train=True)
    assert not run.follows(Position(0))  # no run yet
    run.restart(Position(4, batch=1))
    run.advance(3)
    assert run.follows(Position(4, batch=2)) and not run.follows(Position(4, batch=1))
    run.advance(3)
    assert run.follows(Position(5)) and not run.follows(Position(6)) and not run.follows(Position(4))
    run.stop()
    assert not run.follows(Position(5))
    val = EpochRun(train=False)
    val.restart(Position(0))
    for _ in range(3):
        val.advance(3)
    assert val.follows(Position(7)) and not val.follows(Position(7, batch=1))  # val reads the same batches each epoch


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

    def start_run(self, position):
        self.starts.append(position.epoch)
        if self.fail:
            self.fail = False
            raise OSError("no producers")

    def take(self, k, index, epoch):
        return torch.tensor([k]), torch.tensor([epoch])

    def close(self):
        self.closed += 1
        self.run.stop()


def test_a_run_that_fails_to_start_closes_and_the_next_iteration_starts_it_again(sample_shards):
    spec = LoaderSpec(data_path=str(sample_shards), split="train", batch_size=4, device=torch.device("cpu"))
    loader = FlakyStart(spec)
    with pytest.raises(OSError, match="no producers"):
        next(iter(loader))
    assert loader.closed == 1 and loader.starts == [0]
    assert [int(x) for x, _ in loader] == list(range(len(loader)))  # started anew, not taken as following on
    assert loader.starts == [0, 0]
    loader.set_epoch(1)
    assert [int(x) for x, _ in loader] == list(range(len(loader))) and loader.starts == [0, 0]  # ran on


# -- the loader's state: StatefulDataLoader's protocol -----------------------------------------------------------


def synthetic(**kw):
    return build_loader(backend="synthetic", batch_size=4, device="cpu", img_size=16, num_classes=3, **kw)


def test_set_epoch_keeps_the_position_of_its_own_epoch_and_starts_another_from_its_beginning():
    with synthetic() as l:
        l.num_samples = 40  # 10 batches an epoch
        assert len(l) == 10
        batches = iter(l)
        for _ in range(3):
            next(batches)
        assert l.state_dict()["batch"] == 3
        l.set_epoch(0)
        assert l.position == Position(0, (), 3) and len(list(l)) == 7 and l.epoch == 1
        for _ in zip(range(2), l):
            pass
        l.set_epoch(4)
        assert l.position == Position(4) and len(list(l)) == 10


def test_a_state_that_does_not_fit_is_refused_in_one_line(sample_shards):
    from pipeline import StateError

    with synthetic(seed=1) as l:
        for _ in zip(range(2), l):
            pass
        state = l.state_dict()
    with synthetic(seed=2) as other, pytest.raises(StateError, match="taken with seed 1, this loader's is 2"):
        other.load_state_dict(state)
    with synthetic(seed=2) as other:  # at an epoch's start only the epoch counts
        other.load_state_dict({**state, "epoch": 3, "batch": 0})
        assert other.position == Position(3)
    with synthetic(split="val") as val, pytest.raises(StateError, match="a state of the train split"):
        val.load_state_dict(state)
    with synthetic() as l, pytest.raises(StateError, match="format 7"):
        l.load_state_dict({**state, "format": 7})
    with synthetic() as l, pytest.raises(StateError, match="without seed, world_size"):
        l.load_state_dict({key: v for key, v in state.items() if key not in ("seed", "world_size")})
    with synthetic(seed=1) as l, pytest.raises(StateError, match="batch 1000000000 of epoch 0, which has 320291"):
        l.load_state_dict({**state, "batch": 10**9})
    assert l.position == Position()  # a state refused leaves the loader where it stood
    with build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu", workers=1,
                      img_size=16) as shards, pytest.raises(StateError, match="another shard set"):
        shards.load_state_dict({**shards.state_dict(), "batch": 1, "shards": "0123456789abcdef"})
    repeated = synthetic(aug_repeats=3, world_size=2)
    for _ in zip(range(2), repeated):
        pass
    with synthetic(aug_repeats=3) as one, pytest.raises(StateError, match="aug_repeats 3 on 2 x 4 .* only as"):
        one.load_state_dict(repeated.state_dict())
    repeated.set_epoch(1)  # at an epoch's start any layout goes on
    with synthetic(aug_repeats=3) as one:
        one.load_state_dict(repeated.state_dict())
        assert one.position == Position(1)


def test_a_state_inside_a_resolution_ramp_goes_on_at_its_epochs_side():
    from pipeline.resolution import ResSchedule

    ramp = ResSchedule(8, 24, 0, 2, step=8)  # 8 px, 16 px, 24 px
    assert ramp.sizes(3) == [8, 16, 24]
    with build_loader(backend="synthetic", batch_size=4, device="cpu", img_size=24, res_schedule=ramp,
                      world_size=2) as l:
        l.num_samples = 64
        l.set_epoch(1)
        for _ in zip(range(3), l):
            pass
        state = l.state_dict()
    assert state["side"] == 16
    with build_loader(backend="synthetic", batch_size=4, device="cpu", img_size=24, res_schedule=ramp) as one:
        one.num_samples = 64
        one.load_state_dict(state)
        sides = [b.side for b in one]
        assert len(sides) == (64 - 3 * 8) // 4 and set(sides) == {16}  # the rest of epoch 1, at its side
        assert {b.side for b in one} == {24} and one.epoch == 3


def test_a_synthetic_state_round_trip_yields_the_rest_of_the_epoch(tmp_path):
    with synthetic() as first:
        first.num_samples = 40  # 10 batches an epoch
        for _ in zip(range(3), first):
            pass
        torch.save(first.state_dict(), tmp_path / "state.pt")
    with synthetic() as again:
        again.num_samples = 40
        again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        assert (again.position, len(again)) == (Position(0, (), 3), 10)
        assert len(list(again)) == 7 and again.position == Position(1) and len(list(again)) == 10
