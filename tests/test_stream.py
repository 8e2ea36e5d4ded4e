"""ShardStream on real Ray and real shards: exactly once, order, ranks, faults, remote, memory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from pipeline.actors import ItemRandom, ShardReader, StaleRequest, shuffled
from pipeline.batch import Batch
from pipeline.plan import ShardEntry
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


def test_shuffle_buffer_is_bounded_and_seeded():
    items = list(range(200))
    a = list(shuffled(items, 16, np.random.default_rng(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffled(items, 16, np.random.default_rng(1)))
    assert a != list(shuffled(items, 16, np.random.default_rng(2)))
    # an item can only come out after it went in: never more than 16 places early
    assert all(pos >= item - 16 for pos, item in enumerate(a))
    assert list(shuffled(items, 16, None)) == items


def test_item_randomness_depends_on_seed_epoch_and_key_only():
    one, other = ItemRandom(), ItemRandom()
    first = one(0, 1, "k").random(4).tolist()
    one(0, 1, "other key").random(100)  # what came before does not matter
    assert one(0, 1, "k").random(4).tolist() == first == other(0, 1, "k").random(4).tolist()
    draws = {tuple(one(*args).random(4).tolist())
             for args in ((0, 1, "k"), (0, 2, "k"), (1, 1, "k"), (0, 1, "j"))}
    assert len(draws) == 4


def test_reader_replays_a_task_from_any_batch_without_ray(shard_set):
    """What a restarted actor does: the batches after `skip_batches` are the same."""
    from pipeline.plan import plan_epoch
    from pipeline.source import ShardSource
    from pipeline.transforms import train_tfms

    stream_shards = [ShardEntry(s["name"], s["count"])
                     for s in shard_set.meta["splits"]["train"]["shards"]]
    task = plan_epoch(stream_shards, batch_size=8, num_actors=1, shuffle=True, seed=3,
                      epoch=1).tasks[0]
    reader = ShardReader(ShardSource.of(shard_set.folder), shuffle_buffer=16)
    reader.start(task, train_tfms(SIZE), "first")
    full = reader.next_batches("first", 3) + reader.next_batches("first", task.num_batches)
    assert len(full) == task.num_batches  # the last call returns what is left
    reader.start(task, train_tfms(SIZE), "again", skip_batches=4)
    tail = reader.next_batches("again", task.num_batches)
    assert [b.keys for b in tail] == [b.keys for b in full[4:]]
    assert all(np.array_equal(a.images, b.images) for a, b in zip(tail, full[4:], strict=True))
    with pytest.raises(StaleRequest):
        reader.next_batches("first")


def test_streams_what_tench_shard_wrote(ray_local, tmp_path):
    """The real sharder's output, read back by webdataset as the oracle, streams once each."""
    import webdataset as wds

    from shards.format import decode_label
    from shards.sample import make_sample
    from shards.sharder import shard_folder

    make_sample(tmp_path / "images", per_class=3, valid_per_class=1)
    meta = shard_folder(tmp_path / "images", tmp_path / "shards", workers=1, progress=False)
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


# ---------------------------------------------------------------------- memory
def proc_memory(pid: int) -> dict:
    """Resident kB by kind from /proc: private heap (RssAnon), shared memory, all (VmRSS)."""
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssShmem", "VmRSS"):
                out[name] = int(value.split()[0]) << 10
    return out


def tree_memory() -> tuple[int, int]:
    """(private heap, total RSS) of this process and its children: raylet, GCS, workers.

    The heap (RssAnon) is where held data would pile up, and it is steady to a few MB.
    The total also counts the torch libraries once per process and the pages of Ray's
    shared-memory object store as they are first touched (bounded by its configured size).
    """
    me = psutil.Process()
    stats = [proc_memory(p.pid) for p in [me, *me.children(recursive=True)]]
    return sum(s.get("RssAnon", 0) for s in stats), sum(s.get("VmRSS", 0) for s in stats)


def epoch_memory(stream) -> tuple[int, int]:
    """(growth of the heap over one epoch, peak total RSS), sampled every 5 ms."""
    before, _ = tree_memory()
    peak, done = [0, 0], threading.Event()

    def watch():
        while not done.is_set():
            peak[:] = map(max, peak, tree_memory())
            time.sleep(0.005)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        n = sum(len(b) for b in stream)  # consume and drop, like a training loop
    finally:
        done.set()
        thread.join()
    assert n == stream.num_samples
    return peak[0] - before, peak[1]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_memory_is_flat_as_the_data_grows(ray_local, tmp_path):
    """4x the data must not raise the peak: only configuration bounds memory.

    Incompressible 144 px images decoded at 128 px: 300 samples are 15 MB of pixels,
    1,200 are 59 MB, so a stream that held on to its data would show it. The shards are
    made in a subprocess so their pixels do not sit in this process's freed heap, where
    a leak could hide.
    """
    code = ("import sys; from tests.shard_fixtures import make_shards\n"
            "for scale in (1, 4):\n"
            "    make_shards(f'{sys.argv[1]}/x{scale}', {'train': 300 * scale}, "
            "image_size=(144, 136), noise=True, samples_per_shard=50, seed=scale)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   cwd=Path(__file__).parent.parent)
    results = {}
    for scale in (1, 4):
        with ShardStream(tmp_path / f"x{scale}", "train", batch_size=32, size=128,
                         num_actors=2, shuffle_buffer=64, prefetch=2) as stream:
            epoch_memory(stream)  # warm-up: imports, first allocations
            results[scale] = epoch_memory(stream)
    (grow1, peak1), (grow4, peak4) = results[1], results[4]
    mb = 1 << 20
    assert grow4 <= 1.3 * grow1 + 16 * mb, f"heap grew {grow1 / mb:.0f}, {grow4 / mb:.0f} MB"
    assert peak4 <= 1.15 * peak1, f"peak RSS 1x {peak1 / mb:.0f} MB, 4x {peak4 / mb:.0f} MB"
