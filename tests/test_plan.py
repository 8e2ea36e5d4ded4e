"""The epoch plan, without Ray: exactly-once, equal ranks, batch cuts, seeded order."""

from __future__ import annotations

import json
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
from pipeline.resume import (
    Position,
    handed_out,
    plan_at,
    resume,
    shards_fingerprint,
    state_of,
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


# ---------------------------------------------------------------- resuming mid-epoch
def setup_of(rank, world_size, num_actors=2, shuffle_buffer=5, drop_last=False, **changes):
    """What a stream's state records besides its position (see pipeline.resume)."""
    return {"split": "train", "seed": 3, "batch_size": 4, "shards": "fp", "rank": rank,
            "world_size": world_size, "num_actors": num_actors, "shuffle": True,
            "shuffle_buffer": shuffle_buffer, "drop_last": drop_last, **changes}


def run_states(world_size, batches, at=None, **kw) -> list[dict]:
    """Every rank's state after `batches` batches of the play at `at` (default epoch 4)."""
    at = at or Position(4)
    return [state_of(setup_of(r, world_size, **kw), Position(at.epoch, at.rest, batches))
            for r in range(world_size)]


def handed(states) -> Counter:
    """(shard, index) of every sample the ranks of `states` were handed, with repeats."""
    got = Counter()
    for s in states:
        at = Position(s["epoch"], None if s["rest"] is None else
                      tuple(Segment(*x) for x in s["rest"]), s["batches"])
        for shard, idx in handed_out(plan_at(SHARDS, s, at), at.batches,
                                     s["shuffle_buffer"]).items():
            got.update((shard, int(i)) for i in idx)
    return got


def new_plans(states, world_size, **kw):
    ats = [resume(states, SHARDS, setup_of(r, world_size, **kw)) for r in range(world_size)]
    assert all(a == ats[0] for a in ats), "every new rank derives the same rest"
    return ats[0], [plan_at(SHARDS, setup_of(r, world_size, **kw), ats[0])
                    for r in range(world_size)]


def test_handed_out_counts_batches_not_samples_in_delivery_order():
    plan = plan_at(SHARDS, setup_of(0, 1, shuffle=False), Position(0))
    got = handed_out(plan, 3, 0)  # 2 actors, round robin: actor 0's b0, b1 and actor 1's b0
    firsts = [seg for t in plan.tasks for seg in slice_segments(t.segments, 0, 4)]
    seconds = slice_segments(plan.tasks[0].segments, 4, 8)
    want = Counter((s.shard, i) for s in firsts + seconds for i in range(s.start, s.stop))
    assert Counter((k, int(i)) for k, v in got.items() for i in v) == want


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_actors", [1, 3])
@pytest.mark.parametrize("old", [1, 2, 3, 4])
def test_elastic_resume_sees_every_sample_once(old, num_actors, drop_last):
    """Any interruption point, any old -> new world size: the rest is re-planned disjointly."""
    n_old = plan_at(SHARDS, setup_of(0, old, num_actors, drop_last=drop_last),
                    Position(4)).num_batches
    wanted = everything() if not drop_last else None
    for batches in range(n_old + 1):
        states = run_states(old, batches, num_actors=num_actors, drop_last=drop_last)
        before = handed(states)
        assert sum(before.values()) == old * batches * 4 or batches == n_old
        for new in (1, 2, 3, 4):
            at, plans = new_plans(states, new, num_actors=2, drop_last=drop_last)
            if at.epoch == 5:  # nothing was left: the next epoch, from its start
                assert at == Position(5) and (batches == n_old or set(before) == wanted)
                continue
            after = Counter(x for p in plans for x in positions(p))
            assert len({p.num_batches for p in plans}) == 1, "equal batch counts per rank"
            assert not set(after) & set(before), "nothing handed out before comes again"
            left = sum(len(s) for s in at.rest)
            assert sum(after.values()) - len(after) < new  # only the usual wrap repeats
            if drop_last:  # no repeats; at most one short batch per rank is dropped
                assert left - new * 4 < sum(after.values()) == len(after) <= left
            else:
                assert set(before) | set(after) == wanted
                assert len(after) == left


@pytest.mark.parametrize("first,second", [(2, 3), (3, 2), (1, 4), (4, 1)])
def test_resume_twice_across_world_sizes(first, second):
    """Interrupted again after an elastic resume: the state carries the rest it planned."""
    for k in (1, 2):
        at, plans = new_plans(run_states(first, k), second)
        assert at.epoch == 4 and at.rest
        for j in range(plans[0].num_batches + 1):
            mid = run_states(second, j, at=at)
            final, last = new_plans(mid, first)
            if final.epoch == 5:  # the second run finished the epoch
                assert j == plans[0].num_batches and final == Position(5)
                last = []
            got = (handed(run_states(first, k)) + handed(mid)
                   + Counter(x for p in last for x in positions(p)))
            assert set(got) == everything()
            assert sum(got.values()) - TOTAL < first + second + first


def test_same_layout_resumes_in_place_and_a_finished_epoch_moves_on():
    n = plan_at(SHARDS, setup_of(1, 2), Position(4)).num_batches
    states = run_states(2, 3)
    assert resume(states[1], SHARDS, setup_of(1, 2)) == Position(4, None, 3)
    assert resume(states, SHARDS, setup_of(0, 2)) == Position(4, None, 3)
    assert resume(run_states(2, n), SHARDS, setup_of(0, 2)) == Position(5)
    # JSON, and small: no keys, no per-sample lists
    assert json.loads(json.dumps(states[0])) == states[0] and len(json.dumps(states[0])) < 400


@pytest.mark.parametrize("key,value", [("split", "valid"), ("seed", 4), ("batch_size", 8),
                                       ("shards", "other")])
def test_a_state_from_other_data_is_refused_naming_the_difference(key, value):
    state = run_states(1, 2)[0]
    with pytest.raises(ValueError, match=f"{key} {setup_of(0, 1)[key]!r}, this stream has "
                                         f"{value!r}"):
        resume(state, SHARDS, setup_of(0, 1, **{key: value}))


def test_incomplete_or_mixed_states_are_refused():
    states = run_states(2, 2)
    with pytest.raises(ValueError, match=r"world_size 2 -> 3.*ranks \[1\] are missing"):
        resume(states[:1], SHARDS, setup_of(0, 3))
    mixed = [states[0], {**states[1], "epoch": 5}]
    with pytest.raises(ValueError, match="not from one run"):
        resume(mixed, SHARDS, setup_of(0, 3))
    with pytest.raises(ValueError, match="version"):
        resume({**states[0], "version": 99}, SHARDS, setup_of(0, 2))
    with pytest.raises(ValueError, match="not a ShardStream state .no version.*batches"):
        resume({"epoch": 1}, SHARDS, setup_of(0, 2))
    with pytest.raises(ValueError, match="12 batches handed out of an epoch of 5"):
        resume({**states[0], "batches": 12}, SHARDS, setup_of(0, 2))
    with pytest.raises(ValueError, match="does not have"):
        resume({**states[0], "rest": [["train-000000.tar", 3, 9]]}, SHARDS, setup_of(0, 2))


def test_the_shards_fingerprint_follows_vocab_names_and_counts():
    fp = shards_fingerprint("v", SHARDS)
    assert fp == shards_fingerprint("v", list(SHARDS))  # a pure function of its inputs
    assert fp != shards_fingerprint("w", SHARDS)
    assert fp != shards_fingerprint("v", [*SHARDS[:-1], ShardEntry(SHARDS[-1].name, 4)])
    assert fp != shards_fingerprint("v", SHARDS[:-1])
