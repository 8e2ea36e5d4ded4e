"""Several data sets in one stream: the mixed epoch plan (pure) and a real Ray stream."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from pipeline.mix import concat_epoch, cut, mix_epoch, source_counts
from pipeline.plan import Segment, ShardEntry, plan_epoch, plan_samples, shard_order, whole_shards
from pipeline.stream import ShardStream
from shards.vocab import Vocab
from tests.shard_fixtures import make_shards

A = [ShardEntry(f"train-{i:06d}.tar", 100) for i in range(10)]  # 1000 samples
B = [ShardEntry(f"train-{i:06d}.tar", 30) for i in range(3)]  # 90 samples, same names


def samples(segments: list[Segment]) -> list[tuple[int, str, int]]:
    return [(s.source, s.shard, i) for s in segments for i in range(s.start, s.stop)]


def test_source_counts_are_proportional_and_exact():
    assert source_counts(400, [3, 1]) == [300, 100]
    assert source_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(source_counts(997, [0.7, 0.2, 0.1])) == 997
    with pytest.raises(ValueError, match="weights"):
        source_counts(10, [0, 0])


def test_mix_draws_the_proportion_spread_evenly():
    epoch = samples(mix_epoch([A, B], [3, 1], 800, shuffle=True, seed=1, epoch=0, run=20))
    assert len(epoch) == 800
    assert Counter(s for s, _, _ in epoch) == {0: 600, 1: 200}
    # every stretch of the epoch holds the sources in proportion (within one run)
    for lo in range(0, 800, 100):
        from_b = sum(s == 1 for s, _, _ in epoch[lo:lo + 100])
        assert abs(from_b - 25) <= 20, (lo, from_b)
    from_a = [x for x in epoch if x[0] == 0]
    assert len(set(from_a)) == len(from_a)  # A is bigger than its share: no repeats


def test_a_small_source_cycles_through_fresh_shuffles_before_repeating():
    epoch = [x for x in samples(mix_epoch([A, B], [3, 1], 800, shuffle=True, seed=1, epoch=0))
             if x[0] == 1]
    assert len(epoch) == 200  # B has 90: two full passes and 20 of a third
    passes = [epoch[:90], epoch[90:180], epoch[180:]]
    assert all(len(set(p)) == len(p) for p in passes)
    assert set(passes[0]) == set(passes[1]) == {(1, e.name, i) for e in B for i in range(30)}
    assert passes[0] != passes[1]  # a fresh shard order each pass
    # the big source: 600 different samples, another draw each epoch
    a0 = {x for x in samples(mix_epoch([A, B], [3, 1], 800, shuffle=True, seed=1, epoch=0))
          if x[0] == 0}
    a1 = {x for x in samples(mix_epoch([A, B], [3, 1], 800, shuffle=True, seed=1, epoch=1))
          if x[0] == 0}
    assert len(a0) == len(a1) == 600 and a0 != a1


def test_mix_is_reproducible_from_seed_and_epoch():
    def plan(seed, epoch):
        return mix_epoch([A, B], [1, 1], 300, shuffle=True, seed=seed, epoch=epoch)

    assert plan(3, 2) == plan(3, 2)
    assert plan(3, 2) != plan(3, 1) and plan(3, 2) != plan(4, 2)
    in_order = mix_epoch([A, B], [1, 1], 300, shuffle=False, seed=3, epoch=0)
    assert [s.shard for s in in_order if s.source == 1][:1] == ["train-000000.tar"]


def test_concat_is_every_sample_of_every_source_once():
    for shuffle in (False, True):
        epoch = samples(concat_epoch([A, B], shuffle=shuffle, seed=0, epoch=4))
        assert len(epoch) == len(set(epoch)) == 1090
    # one source: exactly today's single-source order
    assert concat_epoch([A], shuffle=True, seed=7, epoch=2) == whole_shards(
        shard_order(A, shuffle=True, seed=7, epoch=2))


def test_mixed_plans_keep_sources_apart_over_ranks_and_actors():
    segs = mix_epoch([A, B], [3, 1], 800, shuffle=True, seed=1, epoch=0)
    got = []
    for rank in range(2):
        plan = plan_samples(segs, batch_size=16, num_actors=3, shuffle=True, seed=1, epoch=0,
                            rank=rank, world_size=2)
        got += [x for t in plan.tasks for x in samples(list(t.segments))]
    assert Counter(got) == Counter(samples(segs))
    # segments of two sources with the same shard name are never merged
    assert cut([Segment("x", 0, 5, 0), Segment("x", 5, 9, 1)], 100) == [
        [Segment("x", 0, 5, 0), Segment("x", 5, 9, 1)]]


def test_single_source_plans_are_unchanged():
    plan = plan_epoch(A, batch_size=16, num_actors=2, shuffle=True, seed=0, epoch=1)
    assert all(s.source == 0 for t in plan.tasks for s in t.segments)
    assert Segment("a", 0, 3) == Segment("a", 0, 3, 0)


# ------------------------------------------------------------------ a real Ray stream
@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    a = make_shards(tmp_path_factory.mktemp("a"), {"train": 40, "valid": 6},
                    samples_per_shard=7, prefix="a/")
    b = make_shards(tmp_path_factory.mktemp("b"), {"train": 9, "valid": 4},
                    samples_per_shard=4, prefix="b/", seed=1)
    assert not set(a.labels["train"]) & set(b.labels["train"])  # keys tell the sets apart
    return a, b


@pytest.mark.ray
def test_stream_over_two_sets(ray_local, two_sets):
    a, b = two_sets
    with ShardStream([a.folder, b.folder], "train", batch_size=8, size=32, num_actors=2,
                     seed=0, shuffle_buffer=8) as concat:
        keys = [k for batch in concat for k in batch.keys]
        assert sorted(keys) == sorted([*a.labels["train"], *b.labels["train"]])
    with ShardStream([a.folder, b.folder], "train", batch_size=8, size=32, num_actors=2,
                     seed=0, shuffle_buffer=8, weights=[1, 1], epoch_size=24) as mixed:
        assert len(mixed) == 3
        first = [k for batch in mixed for k in batch.keys]
        second = [k for batch in mixed for k in batch.keys]
        for keys in (first, second):
            origin = Counter("a" if k in a.labels["train"] else "b" for k in keys)
            assert origin == {"a": 12, "b": 12}
            from_b = [k for k in keys if k in b.labels["train"]]
            assert len(set(from_b)) == 9  # b (9 samples) fully before any repeat
            labels = {**a.labels["train"], **b.labels["train"]}
            assert all(k in labels for k in keys)
        assert first != second
        state = mixed.state_dict()
        mixed.load_state_dict(state)
        with pytest.raises(ValueError, match="same layout"):
            mixed.load_state_dict([{**state, "rank": r, "world_size": 2} for r in (0, 1)])


@pytest.mark.ray
def test_sources_must_share_a_vocab(ray_local, two_sets, tmp_path):
    a, _ = two_sets
    other = make_shards(tmp_path / "c", {"train": 5, "valid": 2}, samples_per_shard=5)
    meta = json.loads((other.folder / "meta.json").read_text())
    meta.update(Vocab(meta["vocab"][::-1]).to_json())
    (other.folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="another vocab") as e:
        ShardStream([a.folder, other.folder], "train", batch_size=4, size=32)
    assert str(a.folder) in str(e.value) and str(other.folder) in str(e.value)
    with pytest.raises(ValueError, match="2 weights for 1"):
        ShardStream([a.folder], "train", batch_size=4, size=32, weights=[1, 2])


def test_plan_pieces_are_short_runs():
    segs = mix_epoch([A, B], [3, 1], 800, shuffle=True, seed=1, epoch=0, run=50)
    runs, last, n = [], None, 0
    for s in segs:
        if s.source != last:
            if n:
                runs.append(n)
            last, n = s.source, 0
        n += len(s)
    assert max(runs) <= 200 and np.mean(runs) > 10  # at most 3 pieces of A in a row (3:1)


def test_fit_takes_several_data_sets_with_weights():
    import argparse

    from trainer.config import FitConfig
    from trainer.fit import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["a", "b", "--weights", "3", "1", "--epoch-size", "100",
                              "--out", "run"])
    config = config_from_args(args)
    assert (config.shards, config.more_shards) == ("a", ("b",))
    assert (config.weights, config.epoch_size) == ((3.0, 1.0), 100)
    assert FitConfig.from_dict(json.loads(config.to_json())) == config  # JSON round trip
    with pytest.raises(ValueError, match="2 weights for 1"):
        FitConfig(shards="a", weights=(1, 2))
    with pytest.raises(ValueError, match="epoch_size needs weights"):
        FitConfig(shards="a", epoch_size=5)
