"""The sample-assignment rule of pipeline/plan.py, checked on synthetic shard lists for world sizes 1..64 and worker
counts 1..16. No files, no processes: a sample is (shard path, index in shard)."""
import random
from collections import Counter

import pytest

from pipeline.plan import EpochPlanner, RankPlan, Stage, rank_plan, steps_per_epoch, worker_batches, worker_of
from pipeline.shards.errors import SettingsError
from pipeline.shards.format import Shard

WORLD_SIZES = range(1, 65)
WORKER_COUNTS = range(1, 17)


def make_shards(count: int, seed: int = 0) -> list[Shard]:
    # Varied sizes, as real shard sets have (a short last shard, uneven classes).
    rng = random.Random(seed)
    return [Shard(f"s{i:04d}.tar", f"s{i:04d}.idx", rng.randint(1, 40)) for i in range(count)]


def samples(segments) -> list[tuple[str, int]]:
    return [(seg.shard.path, i) for seg in segments for i in range(seg.start, seg.stop)]


def plans(shards, world_size, batch_size, train, epoch=0) -> list[RankPlan]:
    return [rank_plan(shards, train=train, batch_size=batch_size, rank=r, world_size=world_size, seed=7, epoch=epoch)
            for r in range(world_size)]


SHARDS = make_shards(120)  # about 2,500 samples
TOTAL = sum(s.num_samples for s in SHARDS)


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_train_epoch_sees_each_sample_at_most_once(batch_size):
    everything = set(samples(plans(SHARDS, 1, 1, train=True)[0].segments))
    assert len(everything) == TOTAL
    for world_size in WORLD_SIZES:
        ps = plans(SHARDS, world_size, batch_size, train=True)
        assert len({p.steps for p in ps}) == 1, "every rank must run the same number of steps"
        seen = [s for p in ps for s in samples(p.segments)]
        assert len(seen) == len(set(seen)), f"world_size={world_size}: a sample read twice in one epoch"
        assert all(p.num_real == p.steps * batch_size for p in ps)
        assert 0 <= TOTAL - len(seen) < world_size * batch_size, f"world_size={world_size}: too many sit out"


def test_every_rank_reads_its_span_of_one_shared_epoch_order():
    for epoch in (0, 1):
        order = samples(plans(SHARDS, 1, 1, train=True, epoch=epoch)[0].segments)
        for world_size in (2, 3, 8, 64):
            for r, p in enumerate(plans(SHARDS, world_size, 4, train=True, epoch=epoch)):
                lo = TOTAL * r // world_size
                assert samples(p.segments) == order[lo:lo + p.steps * 4]


def test_shard_order_changes_with_epoch_but_not_val():
    orders = {e: [seg.shard.path for seg in plans(SHARDS, 1, 1, train=True, epoch=e)[0].segments] for e in range(3)}
    assert len({tuple(o) for o in orders.values()}) == 3
    assert all(sorted(o) == sorted(s.path for s in SHARDS) for o in orders.values())
    val = [seg.shard.path for seg in plans(SHARDS, 1, 1, train=False, epoch=5)[0].segments]
    assert val == [s.path for s in SHARDS]


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_val_covers_every_sample_exactly_once_padding_in_the_tail(batch_size):
    for world_size in WORLD_SIZES:
        ps = plans(SHARDS, world_size, batch_size, train=False)
        assert len({p.steps for p in ps}) == 1
        seen = [s for p in ps for s in samples(p.segments)]
        assert sorted(seen) == sorted(samples(plans(SHARDS, 1, 1, train=False)[0].segments))
        for p in ps:
            assert p.steps * batch_size - p.num_real >= 0
            planner = EpochPlanner(tuple(SHARDS), False, batch_size, ps.index(p), world_size, 7)
            batches = [planner.batch(0, i) for i in range(p.steps)]
            assert [r for b in batches for r in b if r] == [(SHARDS[int(s[1:5])], i) for s, i in samples(p.segments)]
            real_per_batch = [sum(r is not None for r in b) for b in batches]
            assert all(len(b) == batch_size for b in batches)
            full = [r == batch_size for r in real_per_batch]
            # Full batches first, then at most one partial batch, then padding only.
            assert full == sorted(full, reverse=True)
            assert sum(0 < r < batch_size for r in real_per_batch) <= 1
            assert real_per_batch == sorted(real_per_batch, reverse=True)


def test_worker_batches_partition_the_steps_and_the_consumer_finds_each_at_its_worker():
    for steps in list(range(0, 40)) + [97, 1251]:
        for workers in WORKER_COUNTS:
            runs = [worker_batches(steps, w, workers) for w in range(workers)]
            assert sorted(i for run in runs for i in run) == list(range(steps)), "every step once"
            assert max(map(len, runs)) - min(map(len, runs)) <= 1
            for w, run in enumerate(runs):
                assert [i for i in range(steps) if worker_of(i, workers) == w] == list(run)


@pytest.mark.parametrize("window", [1, 7, 64, 10_000])
def test_train_batches_deal_out_each_window_of_the_rank_span(window):
    batch_size, world_size = 6, 3
    for rank in range(world_size):
        planner = EpochPlanner(tuple(SHARDS), True, batch_size, rank, world_size, 7, shuffle_window=window)
        for epoch in (0, 1):
            p = planner.plan(epoch)
            span = [(SHARDS[int(s[1:5])], i) for s, i in samples(p.segments)]
            batches = [planner.batch(epoch, i) for i in range(p.steps)]
            assert all(len(b) == batch_size and None not in b for b in batches)
            assert sorted(map(str, sum(batches, []))) == sorted(map(str, span)), "the span's samples, each once"
            per_window = planner.window_batches * batch_size
            for i, b in enumerate(batches):  # each batch draws from its own window of the span only
                first = i // planner.window_batches * per_window
                assert {str(r) for r in b} <= {str(r) for r in span[first:first + per_window]}
            assert batches == [planner.batch(epoch, i) for i in range(p.steps)], "a pure function of (epoch, i)"
            if window >= 64:
                assert sum(batches, []) != span, "permuted within the window"
        assert planner.batch(0, 0) != planner.batch(1, 0)
    with pytest.raises(IndexError):
        planner.batch(0, p.steps)


def test_train_too_small_for_one_batch_per_rank_is_a_clear_error():
    with pytest.raises(SettingsError, match="lower --batch-size"):
        rank_plan(make_shards(2), train=True, batch_size=10_000, rank=0, world_size=2, seed=0, epoch=0)


def read(planner_args: dict, epoch: int, steps=None) -> list[tuple[str, int]]:
    """Every sample the ranks of one layout read in `epoch` (all ranks, first `steps` batches each)."""
    out = []
    for rank in range(planner_args["world_size"]):
        planner = EpochPlanner(rank=rank, **planner_args)
        for i in range(planner.plan(epoch).steps if steps is None else steps):
            out += [(shard.path, k) for shard, k in planner.batch(epoch, i)]
    return out


@pytest.mark.parametrize("layouts", [[(2, 8, 5), (3, 4)], [(4, 2, 17), (1, 16)], [(2, 8, 3), (3, 5, 4), (2, 2)],
                                     [(2, 8, 0), (1, 16)]])
def test_an_elastic_resume_reads_the_rest_of_the_epoch_once(layouts):
    # Rule 6: layouts (world size, batch size, steps done) each run part of epoch 3; the last one runs the rest.
    shards = make_shards(9)
    total = sum(s.num_samples for s in shards)
    common = dict(shards=tuple(shards), train=True, seed=7, shuffle_window=24)
    seen, stages = [], []
    for world_size, batch_size, *done in layouts:
        args = dict(common, batch_size=batch_size, world_size=world_size, resumed_epoch=3 if stages else None,
                    stages=tuple(stages))
        seen += read(args, 3, steps=done[0] if done else None)
        if done:
            stages.append(Stage(world_size, batch_size, done[0]))
    world_size, batch_size = layouts[-1][:2]
    assert len(seen) == len(set(seen)), "a sample was read twice in the epoch"
    assert total - world_size * batch_size < len(seen) <= total  # the last layout's remainder sits out


def test_the_first_layout_of_an_elastic_epoch_reads_what_it_read_before():
    # The stage's own batches are recomputed from the plan of a run never resumed: the rest must exclude exactly them.
    shards = make_shards(5)
    args = dict(shards=tuple(shards), train=True, seed=1, shuffle_window=16, batch_size=4, world_size=2)
    first = read(args, 0, steps=3)
    rest = read(dict(args, world_size=1, batch_size=8, resumed_epoch=0, stages=(Stage(2, 4, 3),)), 0)
    assert not set(first) & set(rest)
    total = sum(s.num_samples for s in shards)
    assert total - 8 < len(first) + len(rest) <= total  # the spans' tails the first layout left out are read now


# -- rule 7: repeated augmentation ---------------------------------------------------------------------------------
ODD_SHARDS = [Shard(f"o{i:04d}.tar", f"o{i:04d}.idx", 2 * random.Random(i).randint(0, 20) + 1) for i in range(70)]


def expanded(shards, repeats: int, epoch: int = 0) -> tuple[list, list]:
    """U (the first ceil(N/a) samples of the epoch's sequence) and E (each of U `repeats` times in a row), built out
    of the plain single-rank plan, as rule 7 defines them."""
    sequence = samples(plans(shards, 1, 1, train=True, epoch=epoch)[0].segments)
    unique = sequence[:-(-len(sequence) // repeats)]
    return unique, [s for s in unique for _ in range(repeats)]


def repeated_reads(shards, world_size, batch_size, repeats, epoch=0, seed=7, window=24) -> list[list]:
    """Every rank's samples of one epoch, batch after batch, as (shard path, index)."""
    out = []
    for rank in range(world_size):
        planner = EpochPlanner(tuple(shards), True, batch_size, rank, world_size, seed, shuffle_window=window,
                               aug_repeats=repeats)
        out.append([(shard.path, k) for i in range(planner.plan(epoch).steps) for shard, k in planner.batch(epoch, i)])
    return out


@pytest.mark.parametrize("shards, world_size, batch_size, repeats", [(SHARDS, 3, 5, 3), (SHARDS, 4, 7, 3),
                                                                     (ODD_SHARDS, 8, 3, 3), (SHARDS, 2, 4, 4),
                                                                     (ODD_SHARDS, 1, 6, 2),
                                                                     ([Shard("t.tar", "t.idx", 5)], 2, 3, 3)])
def test_repeated_rank_sequences_are_strided_positions_of_the_expanded_sequence(shards, world_size, batch_size,
                                                                                repeats):
    unique, ex = expanded(shards, repeats)
    steps = len(ex) // world_size // batch_size  # 5 samples: U = 2, E = 6, one batch of 3 per rank (a plain epoch: 0)
    for rank in range(world_size):
        plan = rank_plan(shards, train=True, batch_size=batch_size, rank=rank, world_size=world_size, seed=7, epoch=0,
                         aug_repeats=repeats)
        assert plan.steps == steps == steps_per_epoch(sum(s.num_samples for s in shards), batch_size, world_size,
                                                      True, repeats)
        assert plan.num_real == steps * batch_size
        read = [(shard.path, k) for shard, k in map(plan.locate, range(plan.num_real))]
        assert read == [ex[rank + p * world_size] for p in range(plan.num_real)]
        assert len(plan.segments) <= len(shards), "U's segments, not a segment (or list entry) per sample"


@pytest.mark.parametrize("shards, world_size, batch_size", [(SHARDS, 3, 5), (SHARDS, 4, 7), (ODD_SHARDS, 8, 3)])
def test_repeated_epoch_reads_each_selected_sample_three_times_on_different_ranks(shards, world_size, batch_size):
    repeats = 3
    unique, ex = expanded(shards, repeats)
    reads = repeated_reads(shards, world_size, batch_size, repeats)
    steps = {len(r) // batch_size for r in reads}
    assert len(steps) == 1 and all(len(r) % batch_size == 0 for r in reads), "every rank runs the same steps"
    read_positions = world_size * steps.pop() * batch_size  # E's first ones; E's tail sits out
    counts = Counter(s for r in reads for s in r)
    assert set(counts) <= set(unique), "a sample outside U was read"
    for i, sample in enumerate(unique):
        assert counts[sample] == min(repeats, max(0, read_positions - repeats * i)), f"U[{i}] read {counts[sample]}x"
    wholly_read = read_positions // repeats
    assert len(unique) - wholly_read <= world_size * batch_size // repeats + 1, "only U's tail is read short"
    for r in reads:
        assert len(r) == len(set(r)), "two copies of a sample on one rank (a <= R)"
    plain = world_size * plans(shards, world_size, batch_size, train=True)[0].steps * batch_size
    assert 0 <= read_positions - plain <= world_size * batch_size, "about as many samples as a plain epoch"
    assert len(counts) < plain * 0.4, "about a third of them distinct"


def test_copies_of_a_sample_are_read_at_about_the_same_step():
    world_size, batch_size, repeats = 4, 5, 3
    reads = repeated_reads(SHARDS, world_size, batch_size, repeats, window=1)  # a window of one batch
    steps_of: dict = {}
    for r in reads:
        for position, sample in enumerate(r):
            steps_of.setdefault(sample, []).append(position // batch_size)
    assert max(max(s) - min(s) for s in steps_of.values()) <= 1
    wide = repeated_reads(SHARDS, world_size, batch_size, repeats, window=10_000)  # one window: the whole epoch
    assert wide != reads and sorted(map(sorted, wide)) == sorted(map(sorted, reads)), "rule 4 permutes them"


def test_more_repeats_than_ranks_puts_copies_on_one_rank():
    world_size, batch_size, repeats = 2, 4, 5
    unique, ex = expanded(SHARDS, repeats)
    reads = repeated_reads(SHARDS, world_size, batch_size, repeats)
    read_positions = sum(map(len, reads))
    for rank, r in enumerate(reads):
        counts = Counter(r)
        for i, sample in enumerate(unique):
            expected = sum(1 for e in range(repeats * i, repeats * i + repeats) if e % world_size == rank
                           and e < read_positions)
            assert counts[sample] == expected
        assert max(counts.values()) == 3  # copies 0, 2, 4 or 1, 3 of U[i] on rank (5i) % 2's and the other


def test_repeated_plans_are_deterministic_and_new_each_epoch():
    args = (SHARDS, 4, 6, 3)
    first = repeated_reads(*args)
    assert repeated_reads(*args) == first, "fresh planners, the same epoch: the same batches"
    assert repeated_reads(*args, seed=8) != first
    later = repeated_reads(*args, epoch=1)
    assert set(sum(later, [])) != set(sum(first, [])), "another epoch selects another U"
    planner = EpochPlanner(tuple(SHARDS), True, 6, 0, 4, 7, shuffle_window=24, aug_repeats=3)
    plain = EpochPlanner(tuple(SHARDS), True, 6, 0, 4, 7, shuffle_window=24)
    assert planner.plan(0) is planner.plan(0), "cached per planner"
    assert planner.plan(0) != plain.plan(0) and planner.batch(0, 0) != plain.batch(0, 0)


@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_one_repeat_is_the_plain_plan_and_val_ignores_repeats(world_size):
    order = samples(plans(SHARDS, 1, 1, train=True)[0].segments)
    steps = TOTAL // (world_size * 4)
    for rank in range(world_size):
        plan = rank_plan(SHARDS, train=True, batch_size=4, rank=rank, world_size=world_size, seed=7, epoch=0,
                         aug_repeats=1)
        assert (plan.repeats, plan.stride, plan.offset, plan.steps) == (1, 1, 0, steps)
        lo = TOTAL * rank // world_size
        assert [(s.path, k) for s, k in map(plan.locate, range(plan.num_real))] == order[lo:lo + steps * 4]
        val = rank_plan(SHARDS, train=False, batch_size=4, rank=rank, world_size=world_size, seed=7, epoch=0,
                        aug_repeats=3)
        assert val == plans(SHARDS, world_size, 4, train=False)[rank]


def test_repeats_refuse_an_elastic_resume_and_a_too_small_split():
    stages = (Stage(2, 4, 3),)
    with pytest.raises(ValueError, match="resumes only on its own world size and batch size"):
        rank_plan(SHARDS, train=True, batch_size=4, rank=0, world_size=1, seed=7, epoch=0, stages=stages,
                  aug_repeats=3)
    planner = EpochPlanner(tuple(SHARDS), True, 4, 0, 1, 7, resumed_epoch=2, stages=stages, aug_repeats=2)
    with pytest.raises(ValueError, match="repeated augmentation"):
        planner.plan(2)
    assert planner.plan(3).steps == len(expanded(SHARDS, 2)[1]) // 4, "the other epochs are not resumed ones"
    rank_plan(SHARDS, train=True, batch_size=4, rank=0, world_size=1, seed=7, epoch=0, stages=stages)  # a = 1: fine
    with pytest.raises(SettingsError, match="lower --batch-size"):
        rank_plan(make_shards(2), train=True, batch_size=10_000, rank=0, world_size=2, seed=0, epoch=0, aug_repeats=3)
    with pytest.raises(ValueError, match="aug_repeats=0"):
        rank_plan(SHARDS, train=True, batch_size=4, rank=0, world_size=1, seed=7, epoch=0, aug_repeats=0)
