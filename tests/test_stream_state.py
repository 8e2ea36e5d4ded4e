"""Resuming a ShardStream mid-epoch from `state_dict()`: same layout, other world sizes, faults.

The pure re-planning is tested exhaustively in test_plan.py; here real Ray actors stream
real shards, and the rest of an epoch is compared with an uninterrupted run, key by key
and pixel by pixel.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from itertools import islice

import pytest
import torch

from pipeline.actors import ShardReader
from pipeline.plan import Segment, shard_entries
from pipeline.resume import Position, handed_out, plan_at
from pipeline.source import ShardSource, read_segment
from pipeline.stream import ShardStream
from pipeline.transforms import train_tfms
from tests.shard_fixtures import make_shards

SIZE = 16
EPOCH = 3


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    # 23 samples in shards of about 5, batches of 4: 6 batches, the last one short
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 23}, samples_per_shard=5)


@pytest.fixture(scope="module")
def streams(ray_local, shard_set):
    """`get(num_actors, rank, world_size, twin)`: one stream per combination, made once and
    shared (a new actor process costs seconds); `twin` makes a second one alike."""
    made: dict = {}

    def get(num_actors=2, rank=0, world_size=1, twin=False) -> ShardStream:
        key = (num_actors, rank, world_size, twin)
        if key not in made:
            made[key] = stream_of(shard_set, num_actors, rank=rank, world_size=world_size)
        return made[key]

    yield get
    for stream in made.values():
        stream.close()


def stream_of(shard_set, num_actors=2, **kw) -> ShardStream:
    return ShardStream(shard_set.folder, "train", batch_size=4, size=SIZE, seed=5,
                       shuffle_buffer=6, num_actors=num_actors, **kw)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def images_by_key(batches) -> dict:
    return {k: b.images[i] for b in batches for i, k in enumerate(b.keys)}


def same_batches(got, want) -> None:
    assert [b.keys for b in got] == [b.keys for b in want]
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
               for a, b in zip(got, want, strict=True))


def state_after(stream: ShardStream, epoch: int, batches: int) -> dict:
    """Play `batches` of `epoch`, take the state (through JSON, as a checkpoint keeps it)."""
    stream.set_epoch(epoch)
    it = iter(stream)
    for _ in range(batches):
        next(it)
    return json.loads(json.dumps(stream.state_dict()))


def test_handed_out_is_what_the_actors_batched(shard_set):
    """The resume's replay of the actor's shuffle names exactly the samples it batched."""
    source = ShardSource.of(shard_set.folder)
    shards = shard_entries(shard_set.meta["splits"]["train"])
    where = {s.key: (e.name, i) for e in shards
             for i, s in enumerate(read_segment(source, Segment(e.name, 0, e.count)))}
    setup = {"split": "train", "seed": 5, "batch_size": 4, "shards": "-", "rank": 1,
             "world_size": 2, "num_actors": 2, "shuffle": True, "shuffle_buffer": 6,
             "drop_last": False}
    plan = plan_at(shards, setup, Position(EPOCH))
    reader = ShardReader(source, shuffle_buffer=6)
    made = {}
    for task in plan.tasks:
        reader.start(task, train_tfms(SIZE), "t")
        made[task.actor] = reader.next_batches("t", task.num_batches)
    delivered = []
    for k, (actor, index) in enumerate(plan.delivery_order(), start=1):
        delivered += [where[key] for key in made[actor][index].keys]
        derived = handed_out(plan, k, 6)
        assert sorted(delivered) == sorted((s, int(i)) for s, idx in derived.items()
                                           for i in idx)


@pytest.mark.ray
@pytest.mark.parametrize("num_actors", [1, 2])
def test_resume_at_every_batch_gives_the_rest_of_the_epoch(streams, num_actors):
    first, again = streams(num_actors), streams(num_actors, twin=True)
    reference = list(first)  # epoch 0 ...
    assert first.state_dict()["epoch"] == 1 and first.state_dict()["batches"] == 0
    first.set_epoch(EPOCH)
    whole, following = list(first), list(first)  # ... EPOCH and EPOCH + 1
    assert len(whole) == len(first) == 6 and keys_of(whole) != keys_of(reference)
    for k in range(len(whole) + 1):
        state = state_after(first, EPOCH, k)
        # handed-out batches only: the actors had prefetched (up to) the whole epoch
        assert (state["epoch"], state["batches"], state["rest"]) == (EPOCH, k, None)
        again.load_state_dict(state)  # `again` is alike, but has not played this epoch
        if k == len(whole):  # a finished epoch: the next one is next, from its start
            assert (again.epoch, again.state_dict()["batches"]) == (EPOCH + 1, 0)
            same_batches(list(again), following)
            continue
        assert again.state_dict() == state  # before iterating, still the loaded place
        again.set_epoch(EPOCH)  # what a training loop does: the loaded epoch is kept
        same_batches(list(again), whole[k:])
        if k in (0, 4):  # the epochs after it go on as usual
            assert again.epoch == EPOCH + 1
            same_batches(list(again), following)


def play_ranks(streams, world_size, batches, states=None) -> tuple[list, list]:
    """Each rank of `world_size`: `batches` batches (None: all) of EPOCH, or of what is left
    of it after loading the old ranks' `states`; and then its state."""
    got, new_states = [], []
    for rank in range(world_size):
        stream = streams(1, rank, world_size)
        if states is not None:
            stream.load_state_dict(states)
            assert stream.state_dict()["epoch"] == EPOCH and stream.state_dict()["rest"]
        else:
            stream.set_epoch(EPOCH)
        it = iter(stream)
        got.append(list(islice(it, batches)))
        new_states.append(json.loads(json.dumps(stream.state_dict())))
    return got, new_states


@pytest.mark.ray
@pytest.mark.parametrize("old,new", [(2, 3), (3, 2)])
def test_elastic_resume_on_another_world_size_sees_every_sample_once(streams, shard_set,
                                                                     old, new):
    single = streams(2)
    single.set_epoch(EPOCH)
    pixels = images_by_key(list(single))  # one uninterrupted run of the epoch
    before, states = play_ranks(streams, old, 1)  # 3 ranks have 2 batches, 2 ranks 3
    assert [s["batches"] for s in states] == [1] * old
    after, resumed = play_ranks(streams, new, None, states)
    assert len({len(batches) for batches in after}) == 1, "equal batch counts per rank"
    seen_before = Counter(keys_of(b for r in before for b in r))
    seen_after = Counter(keys_of(b for r in after for b in r))
    assert not set(seen_before) & set(seen_after)
    assert set(seen_before) | set(seen_after) == set(shard_set.labels["train"])
    assert sum(seen_after.values()) - len(seen_after) < new  # the usual wrap repeats only
    assert sum(seen_before.values()) == old * 4  # nothing repeated before the stop
    # the same epoch, so every item has the pixels it has in an uninterrupted run
    for key, image in images_by_key(b for r in before + after for b in r).items():
        assert torch.equal(image, pixels[key]), key
    assert all(s["epoch"] == EPOCH + 1 and s["rest"] is None for s in resumed)


@pytest.mark.ray
def test_a_state_taken_after_an_actor_was_killed_and_replayed(streams, shard_set):
    plain = streams(2)
    plain.set_epoch(EPOCH)
    whole = list(plain)
    # one request of one batch in flight per actor: the kill lands mid-epoch
    with stream_of(shard_set, 2, prefetch=1, batches_per_call=1) as stream:
        stream.set_epoch(EPOCH)
        got = []
        for i, batch in enumerate(stream):
            got.append(batch)
            if i == 0:
                pid = stream.actor_pids()[0]
                os.kill(pid, signal.SIGKILL)
            if i == 3:
                assert pid not in stream.actor_pids()  # replayed by a new process
                state = json.loads(json.dumps(stream.state_dict()))
                break
    assert state["batches"] == 4
    same_batches(got, whole[:4])
    again = streams(2, twin=True)
    again.load_state_dict(state)
    same_batches(list(again), whole[4:])


@pytest.mark.ray
def test_a_state_from_other_settings_or_an_incomplete_run_is_refused(streams):
    state = state_after(streams(1), EPOCH, 2)
    with pytest.raises(ValueError, match="seed 6, this stream has 5"):
        streams(1, twin=True).load_state_dict({**state, "seed": 6})
    with pytest.raises(ValueError, match=r"world_size 2 -> 3.*ranks \[1\] are missing"):
        streams(1, 0, 3).load_state_dict({**state, "world_size": 2})  # rank 0 of 2 alone
