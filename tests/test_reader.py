"""pipeline/shards/reader.py: samples by (shard, index) through the .idx, in the order asked for; a shard cut short
is named as such when its sample is used."""
from __future__ import annotations

import pickle
import shutil

import pytest

from pipeline.shards.errors import SampleError
from pipeline.shards.format import shard_list
from pipeline.shards.reader import ShardReader, usable_label


def test_reads_any_samples_in_the_order_asked(sample_shards):
    shards = shard_list(sample_shards, "train")
    reader = ShardReader(cached_indexes=2)
    everything = [s for shard in shards for s in reader.read_all(shard)]
    assert len(everything) == sum(s.num_samples for s in shards) == 48
    refs = [(shards[3], 4), (shards[0], 9), (shards[3], 0), (shards[1], 2), (shards[0], 0)]
    got = reader.read(refs)
    starts = {shard: sum(s.num_samples for s in shards[:k]) for k, shard in enumerate(shards)}
    assert [(s.key, s.jpg, s.cls) for s in got] == [(everything[starts[sh] + i].key, everything[starts[sh] + i].jpg,
                                                     everything[starts[sh] + i].cls) for sh, i in refs]
    assert all(s.jpg[:2] == b"\xff\xd8" and 0 <= usable_label(s, 4) < 4 for s in got)
    copy = pickle.loads(pickle.dumps(reader))  # what a worker process gets: no cached indexes
    assert copy._indexes == {} and [s.key for s in copy.read(refs)] == [s.key for s in got]


def test_a_shard_cut_short_is_named_when_its_sample_is_used(sample_shards, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(sample_shards, data)
    shard = shard_list(data, "train")[0]
    with open(shard.path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    samples = list(ShardReader().read_all(shard))
    assert usable_label(samples[0], 4) >= 0  # the first half still reads
    with pytest.raises(SampleError, match=r"train-000000\.tar: sample \S+: the shard is cut short"):
        for s in samples:
            usable_label(s, 4)
