"""pipeline.actors without Ray: the shuffle buffer, per-item randomness and `ShardReader`
called directly, as the stream's actors run it (the Ray side is in test_stream.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.actors import (
    ItemRandom,
    ShardReader,
    Skip,
    StaleRequest,
    shuffled,
    use_ray_thread_count,
)
from pipeline.plan import ActorTask, Segment, ShardEntry, plan_epoch
from pipeline.source import ShardReadError, ShardSource
from pipeline.transforms import compose, train_tfms, valid_tfms
from shards.format import encode_info
from shards.writer import ShardWriter
from tests.shard_fixtures import encode, make_image, make_shards, truncate_shard

SIZE = 16


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 53}, samples_per_shard=7)


def write_shard(folder, count: int, bad: tuple[int, ...] = ()) -> tuple[str, list[str]]:
    """One shard of `count` JPEGs labelled i % 3; the samples in `bad` hold bytes no decoder
    reads. Returns its name and the keys in order."""
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in range(count)]
    with ShardWriter(folder, "train", max_bytes=1 << 30) as writer:
        for i, key in enumerate(keys):
            data = b"\xff\xd8 not a jpeg" if i in bad else encode(
                make_image(rng, (24, 20), False), "JPEG")
            writer.write(key, "jpg", data, i % 3, encode_info(f"c/{key}.jpg", "c"))
    return writer.shards[0].name, keys


def in_order(name: str, count: int, batch: int) -> ActorTask:
    """The whole shard, unshuffled, in batches of `batch`."""
    sizes = (batch,) * (count // batch) + ((count % batch,) if count % batch else ())
    return ActorTask(0, (Segment(name, 0, count),), sizes, seed=0, epoch=0)


def run(reader: ShardReader, task: ActorTask, token: str = "t", tfm=None) -> list:
    reader.start(task, tfm or valid_tfms(SIZE), token)
    return reader.next_batches(token, task.num_batches + 1)


# --------------------------------------------------------------------------- shuffle, randomness
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


def test_ray_thread_count_is_given_to_torch_only_when_ray_set_it(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        use_ray_thread_count()
        assert torch.get_num_threads() == 2  # a plain process: left alone
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        use_ray_thread_count()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- ShardReader
def test_batches_are_uint8_squares_labelled_from_the_shard_in_order(tmp_path):
    name, keys = write_shard(tmp_path, 10)
    reader = ShardReader(ShardSource.of(tmp_path))
    batches = run(reader, in_order(name, 10, 4))
    assert [len(b.keys) for b in batches] == [4, 4, 2]
    assert [k for b in batches for k in b.keys] == keys  # no shuffle seed: shard order
    assert [int(x) for b in batches for x in b.labels] == [i % 3 for i in range(10)]
    for b in batches:
        assert b.images.dtype == np.uint8 and b.images.shape == (len(b.keys), SIZE, SIZE, 3)
        assert b.labels.dtype == np.int64 and b.skips == [] and b.padded == 0
    assert len({b.images[i].tobytes() for b in batches for i in range(len(b.keys))}) == 10


def test_reader_replays_a_task_from_any_batch(shard_set):
    """What a restarted actor does: the batches after `skip_batches` are the same."""
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


def test_an_undecodable_image_fails_naming_shard_and_sample(tmp_path):
    name, keys = write_shard(tmp_path, 6, bad=(4,))
    reader = ShardReader(ShardSource.of(tmp_path))
    reader.start(in_order(name, 6, 3), valid_tfms(SIZE), "t")
    assert reader.next_batches("t")[0].keys == keys[:3]
    with pytest.raises(ShardReadError, match=f"shard {name}: sample {keys[4]}.jpg") as err:
        reader.next_batches("t")
    assert err.value.shard == name


def test_skip_mode_counts_the_bad_image_and_refills_the_batch(tmp_path):
    name, keys = write_shard(tmp_path, 6, bad=(1,))
    reader = ShardReader(ShardSource.of(tmp_path), on_error="skip")
    first, second = run(reader, in_order(name, 6, 3))
    assert first.padded == 1 and len(first.skips) == 1 and second.skips == []
    skip = first.skips[0]
    assert (skip.shard, skip.where, skip.count) == (name, f"sample {keys[1]}", 1)
    assert str(skip).startswith(f"shard {name}, sample {keys[1]}: skipped 1 (")
    # the hole is filled with a repeat of the batch's first good item: key, label and pixels
    assert first.keys == [keys[0], keys[0], keys[2]]
    assert np.array_equal(first.images[1], first.images[0]) and first.labels[1] == 0
    assert second.keys == keys[3:] and second.padded == 0


def test_skip_mode_refills_a_batch_cut_short_by_a_truncated_shard(tmp_path):
    name, keys = write_shard(tmp_path, 8)
    truncate_shard(tmp_path, name, at_sample=5)
    reader = ShardReader(ShardSource.of(tmp_path), on_error="skip")
    batches = run(reader, in_order(name, 8, 4))
    assert [b.keys[:1] for b in batches] == [[keys[0]], [keys[4]]]
    assert batches[1].padded == 3 and batches[1].keys == [keys[4]] * 4
    assert [str(s) for s in batches[1].skips] == [
        f"{Skip(name, 'samples 5-7', 3, batches[1].skips[0].reason)}"]
    assert "ended after 5 samples" in batches[1].skips[0].reason


def test_skip_mode_with_nothing_readable_yet_names_the_shard(tmp_path):
    name, _ = write_shard(tmp_path, 3, bad=(0, 1, 2))
    reader = ShardReader(ShardSource.of(tmp_path), on_error="skip")
    with pytest.raises(ShardReadError, match=f"{name}: nothing readable to fill a batch"):
        run(reader, in_order(name, 3, 3))


class Pad:
    """A (bad) transform after the crop: one row more than the chain declares."""

    order = 99

    def __call__(self, image, rng):
        return np.concatenate([image, image[:1]])


def test_a_chain_whose_output_disagrees_with_its_declared_size_is_refused(tmp_path):
    name, keys = write_shard(tmp_path, 2)
    reader = ShardReader(ShardSource.of(tmp_path))
    chain = compose([*valid_tfms(SIZE).tfms, Pad()], size=SIZE)  # Pad changes the shape after
    with pytest.raises(ValueError, match=rf"{name}:{keys[0]}\.jpg.*after its last crop"):
        run(reader, in_order(name, 2, 2), tfm=chain)


def test_on_error_must_be_fail_or_skip():
    with pytest.raises(ValueError, match="on_error must be one of"):
        ShardReader(ShardSource.of("/nowhere"), on_error="ignore")
