"""The epoch plan, without Ray: exactly-once, equal ranks, batch cuts, seeded order."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.plan import (
    Segment,
    ShardEntry,
    plan_epoch,
    shard_entries,
    shard_order,
    slice_segments,
    take_positions,
)

SHARDS = [ShardEntry(f"train-{i:06d}.tar", c) for i, c in enumerate([7, 5, 9, 1, 8, 3])]
TOTAL = 33


def positions(plan) -> list[tuple[str, int]]:
    """Every (shard, sample index) the plan streams, in task order."""
    return [(s.shard, i) for t in plan.tasks for s in t.segments for i in range(s.start, s.stop)]


def everything(shards=SHARDS) -> set:
    return {(e.name, i) for e in shards for i in range(e.count)}


@pytest.mark.parametrize("num_actors", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("batch_size", [1, 4, 10, 64])
def test_one_rank_streams_every_sample_once(num_actors, batch_size):
    plan = plan_epoch(SHARDS, batch_size=batch_size, num_actors=num_actors, shuffle=True,
                      seed=3, epoch=1)
    got = positions(plan)
    assert len(got) == TOTAL and set(got) == everything()
    assert plan.num_batches == -(-TOTAL // batch_size)
    assert sum(t.num_batches for t in plan.tasks) == plan.num_batches
    # only one batch in the whole epoch may be short, and it is the last actor's last
    sizes = [b for t in plan.tasks for b in t.batch_sizes]
    assert all(b == batch_size for b in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    for t in plan.tasks:
        assert sum(len(s) for s in t.segments) == t.num_samples
    assert len(plan.delivery_order()) == plan.num_batches


def test_drop_last_drops_only_the_partial_batch():
    plan = plan_epoch(SHARDS, batch_size=10, num_actors=2, shuffle=False, seed=0, epoch=0,
                      drop_last=True)
    assert plan.num_batches == 3 and plan.num_samples == 30
    assert all(b == 10 for t in plan.tasks for b in t.batch_sizes)
    assert len(set(positions(plan))) == 30


@pytest.mark.parametrize("world_size", [2, 3, 4, 5])
@pytest.mark.parametrize("num_actors", [1, 2])
def test_ranks_are_disjoint_equal_and_cover_the_split(world_size, num_actors):
    plans = [plan_epoch(SHARDS, batch_size=4, num_actors=num_actors, shuffle=True, seed=9,
                        epoch=2, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({p.num_batches for p in plans}) == 1, "every rank must get the same batch count"
    assert len({p.num_samples for p in plans}) == 1
    per_rank = [positions(p) for p in plans]
    for got in per_rank:
        assert len(got) == len(set(got)), "a rank never repeats a sample within itself"
    counts = Counter(x for got in per_rank for x in got)
    assert set(counts) == everything(), "the union over ranks is the whole split"
    repeats = sum(counts.values()) - TOTAL
    assert repeats == world_size * -(-TOTAL // world_size) - TOTAL < world_size


def test_ranks_with_drop_last_never_repeat():
    plans = [plan_epoch(SHARDS, batch_size=4, num_actors=2, shuffle=True, seed=1, epoch=0,
                        rank=r, world_size=4, drop_last=True) for r in range(4)]
    got = [x for p in plans for x in positions(p)]
    assert len(got) == len(set(got)) == 4 * 8  # 33 // 4 = 8 per rank, 2 full batches each
    assert {p.num_batches for p in plans} == {2}


def test_more_ranks_than_samples_still_equal():
    tiny = [ShardEntry("train-000000.tar", 2)]
    plans = [plan_epoch(tiny, batch_size=4, num_actors=1, shuffle=False, seed=0, epoch=0,
                        rank=r, world_size=3) for r in range(3)]
    assert [p.num_samples for p in plans] == [1, 1, 1]
    assert {x for p in plans for x in positions(p)} == everything(tiny)


def test_order_is_seeded_by_seed_and_epoch():
    names = lambda **kw: [e.name for e in shard_order(SHARDS, **kw)]  # noqa: E731
    assert names(shuffle=True, seed=1, epoch=0) == names(shuffle=True, seed=1, epoch=0)
    assert names(shuffle=True, seed=1, epoch=0) != names(shuffle=True, seed=1, epoch=1)
    assert names(shuffle=True, seed=1, epoch=0) != names(shuffle=True, seed=2, epoch=0)
    assert names(shuffle=False, seed=1, epoch=5) == sorted(e.name for e in SHARDS)
    a = plan_epoch(SHARDS, batch_size=4, num_actors=2, shuffle=True, seed=1, epoch=3)
    b = plan_epoch(SHARDS, batch_size=4, num_actors=2, shuffle=True, seed=1, epoch=3)
    assert a == b
    assert plan_epoch(SHARDS, batch_size=4, num_actors=1, shuffle=False, seed=0,
                      epoch=0).tasks[0].shuffle_seed is None


def test_delivery_order_is_round_robin():
    plan = plan_epoch(SHARDS, batch_size=4, num_actors=3, shuffle=False, seed=0, epoch=0)
    counts = [t.num_batches for t in plan.tasks]  # 9 batches over 3 actors
    assert counts == [3, 3, 3]
    assert plan.delivery_order()[:4] == [(0, 0), (1, 0), (2, 0), (0, 1)]


def test_segment_helpers():
    segs = take_positions(SHARDS[:2], 5, 14)  # 7 + 5 = 12 samples, wraps to the start
    assert segs == [Segment("train-000000.tar", 5, 7), Segment("train-000001.tar", 0, 5),
                    Segment("train-000000.tar", 0, 2)]
    assert slice_segments(segs, 1, 4) == [Segment("train-000000.tar", 6, 7),
                                          Segment("train-000001.tar", 0, 2)]
    entries = shard_entries({"count": 3, "shards": [{"name": "b", "count": 1},
                                                    {"name": "a", "count": 2}]})
    assert entries == [ShardEntry("a", 2), ShardEntry("b", 1)]


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="rank 2"):
        plan_epoch(SHARDS, batch_size=4, num_actors=1, shuffle=False, seed=0, epoch=0,
                   rank=2, world_size=2)
    with pytest.raises(ValueError, match="no samples"):
        take_positions([ShardEntry("a", 0)], 0, 1)
