"""ShardStream on real Ray and real shards: exactly once, order, ranks, faults, remote.

Memory: test_stream_memory.py; the actor's own logic without Ray: test_actors.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter

import pytest
import torch

from pipeline.batch import Batch
from pipeline.settings import StreamSettings
from pipeline.source import ShardReadError
from pipeline.stream import ShardStream
from shards.vocab import Vocab
from tests.shard_fixtures import (
    CLASSES,
    make_shards,
    serve_http,
    serve_s3,
    truncate_shard,
)

pytestmark = pytest.mark.ray
SIZE = 32


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    # 3 and 5 items per shard leave partial shards and a partial last batch everywhere
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 53, "valid": 17},
                       samples_per_shard=7)


@pytest.fixture(scope="module")
def train2(ray_local, shard_set):
    """A two-actor training stream, shared by the tests that only iterate it."""
    with ShardStream(shard_set.folder, "train", batch_size=4, size=SIZE, num_actors=2,
                     seed=5, shuffle_buffer=16) as stream:
        yield stream


@pytest.fixture(scope="module")
def valid1(ray_local, shard_set):
    """A one-actor validation stream (in order), one batch asked for at a time: after the
    first batch, most of the epoch is still to be made (the kill test relies on it)."""
    with ShardStream(shard_set.folder, "valid", batch_size=4, size=SIZE, num_actors=1,
                     prefetch=1, batches_per_call=1) as s:
        yield s


def play(stream, epoch=None) -> list[Batch]:
    if epoch is not None:
        stream.set_epoch(epoch)
    return list(stream)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def images_by_key(batches) -> dict:
    return {k: b.images[i] for b in batches for i, k in enumerate(b.keys)}


def check_batches(batches, stream, labels: dict) -> None:
    """Shapes, dtypes, labels that match the shards, and the batch count `len` promised."""
    assert len(batches) == len(stream)
    for b in batches:
        assert b.images.dtype == torch.uint8 and b.images.shape == (len(b), 3, SIZE, SIZE)
        # channels-last memory, as the trainer wants it, and the batch's own (writable) copy
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.images.untyped_storage().nbytes() == b.images.numel()
        assert b.labels.dtype == torch.int64
        assert b.labels.tolist() == [labels[k] for k in b.keys]
    sizes = [len(b) for b in batches]
    assert all(s == stream.batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= stream.batch_size


def test_every_sample_exactly_once_two_actors(shard_set, train2):
    labels = shard_set.labels["train"]
    assert train2.num_actors == 2 and len(train2) == 14  # ceil(53 / 4)
    batches = play(train2, 0)
    check_batches(batches, train2, labels)
    assert Counter(keys_of(batches)) == Counter(list(labels))
    assert train2.vocab == Vocab(CLASSES) and train2.stats == shard_set.meta["stats"]
    assert train2.skipped == 0


def test_every_sample_exactly_once_one_actor_valid_in_order(shard_set, valid1):
    labels = shard_set.labels["valid"]
    first, second = play(valid1), play(valid1)
    check_batches(first, valid1, labels)
    # one actor, no shuffle: the order the samples were written, the same every time
    assert keys_of(first) == list(labels) == keys_of(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.images, b.images)


def test_same_seed_and_epoch_same_order_new_epoch_new_order(shard_set, train2):
    a, again = play(train2, 3), play(train2, 3)
    assert keys_of(a) == keys_of(again)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, again, strict=True))
    b = play(train2, 4)
    assert keys_of(b) != keys_of(a) and sorted(keys_of(b)) == sorted(keys_of(a))
    assert train2.epoch == 5  # iterating advances the epoch; set_epoch picks one
    # another stream with the same settings (another run) gives the same epoch
    with ShardStream(shard_set.folder, "train", batch_size=4, size=SIZE, num_actors=2,
                     seed=5, shuffle_buffer=16) as twin:
        twin_a = play(twin, 3)
    assert keys_of(twin_a) == keys_of(a)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, twin_a, strict=True))


def test_batches_per_call_changes_the_transfer_not_the_stream(shard_set, train2):
    """Whether an actor returns 1, 3 or the default number of batches per Ray object, the
    epoch is the same batches, each its own copy (see `check_batches`)."""
    labels = shard_set.labels["train"]
    reference = play(train2, 2)
    assert train2.batches_per_call == 8  # 4 x 32 px batches are tiny: the cap
    for per_call in (1, 3):
        with ShardStream(shard_set.folder, "train", batch_size=4, size=SIZE, num_actors=2,
                         seed=5, shuffle_buffer=16, batches_per_call=per_call) as other:
            batches = play(other, 2)
        check_batches(batches, other, labels)
        assert keys_of(batches) == keys_of(reference)
        assert all(torch.equal(x.images, y.images) for x, y in zip(batches, reference,
                                                                    strict=True))


def test_a_new_size_next_epoch_on_the_same_actors(ray_local, shard_set, train2):
    """Progressive resizing: 48 px, then 64 px, from the same actors; the order is the
    stream's as always, and each item's pixels are what a stream built at 64 px makes."""
    settings = StreamSettings(batch_size=4, num_actors=2, seed=5, shuffle_buffer=16)
    with ShardStream(shard_set.folder, "train", settings, size=48) as stream:
        pids = stream.actor_pids()
        small = play(stream, 0)
        stream.set_size(64)
        assert stream.size == 64 and stream.batches_per_call == 8
        large = play(stream, 1)
        assert stream.actor_pids() == pids
    assert {tuple(b.images.shape[1:]) for b in small} == {(3, 48, 48)}
    assert {tuple(b.images.shape[1:]) for b in large} == {(3, 64, 64)}
    assert keys_of(large) == keys_of(play(train2, 1))  # the size does not touch the order
    with ShardStream(shard_set.folder, "train", settings.replace(num_actors=1),
                     size=64) as fresh:
        expected = images_by_key(play(fresh, 1))
    got = images_by_key(large)
    assert got.keys() == expected.keys()
    assert all(torch.equal(image, expected[k]) for k, image in got.items())


def test_own_transforms_set_the_size(ray_local, shard_set):
    from pipeline.transforms import CenterCrop, ResizeShorter, ToRGB

    with ShardStream(shard_set.folder, "valid", batch_size=4, num_actors=1,
                     item_tfms=[ToRGB(), ResizeShorter(30), CenterCrop(24)]) as stream:
        assert stream.size == 24
        assert {tuple(b.images.shape[1:]) for b in play(stream)} == {(3, 24, 24)}
        with pytest.raises(ValueError, match="own item_tfms"):
            stream.set_size(32)
        stream.set_item_tfms([ToRGB(), CenterCrop(16)])
        assert {tuple(b.images.shape[1:]) for b in play(stream)} == {(3, 16, 16)}


def test_stopping_early_then_a_full_epoch(shard_set, train2):
    """Like an LR finder: break off an epoch; the next one is still whole, and in order."""
    reference = play(train2, 9)
    train2.set_epoch(9)
    broken = iter(train2)
    assert next(broken).keys == reference[0].keys
    again = play(train2, 9)
    assert keys_of(again) == keys_of(reference)
    with pytest.raises(RuntimeError, match="newer iteration"):
        next(broken)


def test_two_ranks_split_the_epoch(ray_local, shard_set):
    labels = shard_set.labels["train"]
    per_rank = []
    for rank in (0, 1):
        with ShardStream(shard_set.folder, "train", batch_size=8, size=SIZE, num_actors=1,
                         rank=rank, world_size=2, seed=1) as stream:
            assert len(stream) == 4  # ceil(ceil(53 / 2) / 8), the same on both ranks
            batches = play(stream, 2)
            check_batches(batches, stream, labels)
            per_rank.append(keys_of(batches))
    assert len(per_rank[0]) == len(per_rank[1]) == 27
    assert all(len(set(keys)) == len(keys) for keys in per_rank)
    assert set(per_rank[0]) | set(per_rank[1]) == set(labels)
    assert len(set(per_rank[0]) & set(per_rank[1])) == 1  # 54 slots for 53 samples: one repeat


def test_drop_last(ray_local, shard_set):
    with ShardStream(shard_set.folder, "train", batch_size=8, size=SIZE, num_actors=1,
                     drop_last=True) as stream:
        batches = play(stream)
    assert len(batches) == len(stream) == 6 and all(len(b) == 8 for b in batches)
    assert len(set(keys_of(batches))) == 48


def test_actor_killed_mid_epoch_loses_and_repeats_nothing(ray_local, shard_set, train2,
                                                         caplog):
    reference = play(train2, 7)
    # one request of 2 batches in flight per actor: when the driver has batch 0, actor 0
    # has at most batches 1-2 made, and 3-6 not even asked for yet
    stream = ShardStream(shard_set.folder, "train", batch_size=4, size=SIZE, num_actors=2,
                         seed=5, shuffle_buffer=16, prefetch=1, batches_per_call=2)
    stream.set_epoch(7)
    got, killed = [], []
    with stream, caplog.at_level(logging.WARNING, logger="pipeline.stream"):
        for i, batch in enumerate(stream):
            got.append(batch)
            if i == 0:
                killed.append(stream.actor_pids()[0])
                os.kill(killed[0], signal.SIGKILL)
        assert killed[0] not in stream.actor_pids()  # a new process took over
    assert "stream actor 0 died" in caplog.text  # the crash was seen and recovered from
    assert keys_of(got) == keys_of(reference)  # same samples, once each, same order
    assert all(torch.equal(a.images, b.images) for a, b in zip(got, reference, strict=True))


def test_ray_kill_with_restart_mid_epoch(shard_set, valid1, caplog):
    import ray

    keys = []
    with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
        for i, batch in enumerate(valid1):
            keys += batch.keys
            if i == 0:
                old = valid1.actor_pids()[0]
                ray.kill(valid1._actors[0], no_restart=False)
                # ray.kill is asynchronous: wait until the restarted actor answers, so the
                # kill cannot land after a fast actor has already made the whole epoch
                deadline = time.monotonic() + 60
                while valid1.actor_pids()[0] == old and time.monotonic() < deadline:
                    time.sleep(0.05)
    assert "stream actor 0 died" in caplog.text
    assert keys == list(shard_set.labels["valid"])


def test_http_source(ray_local, shard_set):
    with serve_http(shard_set.folder) as url, \
            ShardStream(url, "valid", batch_size=4, size=SIZE, num_actors=1) as stream:
        batches = play(stream)
    check_batches(batches, stream, shard_set.labels["valid"])
    assert Counter(keys_of(batches)) == Counter(list(shard_set.labels["valid"]))


def test_s3_source(ray_local, shard_set):
    with serve_s3(shard_set.folder) as (url, options), \
            ShardStream(url, "valid", batch_size=4, size=SIZE, num_actors=1,
                        storage_options=options) as stream:
        batches = play(stream)
    check_batches(batches, stream, shard_set.labels["valid"])
    assert Counter(keys_of(batches)) == Counter(list(shard_set.labels["valid"]))


@pytest.fixture
def corrupt_set(tmp_path):
    shard_set = make_shards(tmp_path, {"train": 30}, samples_per_shard=10)
    name = shard_set.meta["splits"]["train"]["shards"][1]["name"]
    truncate_shard(tmp_path, name, 0.5)
    return shard_set, name


def test_corrupt_shard_fails_naming_it(ray_local, corrupt_set):
    shard_set, name = corrupt_set
    with ShardStream(shard_set.folder, "train", batch_size=4, size=SIZE, num_actors=1) as s, \
            pytest.raises(ShardReadError, match=name):
        play(s)


def test_corrupt_shard_skipped_is_counted_and_reported(ray_local, corrupt_set, caplog):
    shard_set, name = corrupt_set
    labels = shard_set.labels["train"]
    with caplog.at_level(logging.WARNING, logger="pipeline.stream"), \
            ShardStream(shard_set.folder, "train", batch_size=4, size=SIZE, num_actors=2,
                        on_error="skip") as stream:
        batches = play(stream)
    check_batches(batches, stream, labels)  # every batch still full: equal counts on ranks
    assert 0 < stream.skipped < 10 and {s.shard for s in stream.skips} == {name}
    distinct = set(keys_of(batches))
    assert len(distinct) == 30 - stream.skipped and distinct <= set(labels)
    assert stream.padded == stream.skipped  # the holes were refilled with repeats, counted
    assert name in caplog.text and "skipped" in caplog.text


def test_streams_what_tench_shard_wrote(ray_local, tmp_path):
    """The real sharder's output, read back by webdataset as the oracle, streams once each."""
    import webdataset as wds

    from shards.format import decode_label
    from shards.sample import make_sample
    from shards.sharder import shard_folder

    make_sample(tmp_path / "images", per_class=3, valid_per_class=1)
    meta = shard_folder(tmp_path / "images", tmp_path / "shards", processes=1, progress=False)
    names = [s["name"] for s in meta["splits"]["train"]["shards"]]
    oracle = {s["__key__"]: decode_label(s["cls"]) for s in wds.WebDataset(
        [str(tmp_path / "shards" / n) for n in names], shardshuffle=False)}
    with ShardStream(tmp_path / "shards", "train", batch_size=4, size=SIZE,
                     num_actors=1) as stream:
        batches = play(stream)
        assert stream.vocab.names == meta["vocab"]
    check_batches(batches, stream, oracle)
    assert Counter(keys_of(batches)) == Counter(list(oracle)) and len(oracle) == 30


def test_vocab_mismatch_is_refused(tmp_path):
    shard_set = make_shards(tmp_path, {"train": 5})
    with pytest.raises(ValueError, match="different label vocab"):
        ShardStream(tmp_path, vocab=Vocab(["cat", "dog", "emu"]))
    meta = dict(shard_set.meta, vocab_fingerprint="0" * 64)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        ShardStream(tmp_path)


def test_bad_arguments_fail_before_ray(tmp_path):
    from pipeline.transforms import CenterCrop

    make_shards(tmp_path, {"train": 5})
    with pytest.raises(ValueError, match="no split 'test'"):
        ShardStream(tmp_path, "test")
    with pytest.raises(ValueError, match="on_error"):
        ShardStream(tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="placement"):
        ShardStream(tmp_path, placement="everywhere")
    with pytest.raises(ValueError, match="rank 2"):
        ShardStream(tmp_path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShardStream(tmp_path, batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="batches_per_call must be at least 1"):
        ShardStream(tmp_path, batches_per_call=0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        ShardStream(tmp_path, batch_size=0)  # before the default batches_per_call divides by it
    with pytest.raises(TypeError, match="settings must be a StreamSettings"):
        ShardStream(tmp_path, "train", 64)  # batch_size was the third argument once
    with pytest.raises(TypeError, match="unknown stream setting.*actor_cpus"):
        ShardStream(tmp_path, actor_cpus=1)
    with pytest.raises(ValueError, match="size=32 disagrees"):
        ShardStream(tmp_path, size=32, item_tfms=[CenterCrop(16)])

