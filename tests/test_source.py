"""Reading meta.json and shard segments: folder, file://, HTTP and S3 on 127.0.0.1."""

from __future__ import annotations

import json
import pickle

import pytest
import webdataset as wds

from pipeline.plan import Segment
from pipeline.source import ShardReadError, ShardSource, iter_samples, read_segment
from shards.format import decode_label
from tests.shard_fixtures import make_shards, serve_http, serve_s3, truncate_shard


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 23, "valid": 6},
                       samples_per_shard=5)


def webdataset_samples(folder, name) -> list:
    """The oracle: what webdataset reads from the same shard."""
    return [(s["__key__"], decode_label(s["cls"]))
            for s in wds.WebDataset(str(folder / name), shardshuffle=False)]


def test_iter_samples_agrees_with_webdataset(shard_set):
    first = shard_set.meta["splits"]["train"]["shards"][0]
    with open(shard_set.folder / first["name"], "rb") as f:
        samples = list(iter_samples(f, first["name"]))
    assert [(s.key, s.label) for s in samples] == webdataset_samples(shard_set.folder,
                                                                     first["name"])
    assert len(samples) == first["count"]
    assert {s.ext for s in samples} <= {"jpg", "png"}
    assert all(s.data[:2] == b"\xff\xd8" or s.data[:4] == b"\x89PNG" for s in samples)


def test_read_segment_takes_a_window(shard_set):
    first = shard_set.meta["splits"]["train"]["shards"][0]
    source = ShardSource.of(shard_set.folder)
    everything = webdataset_samples(shard_set.folder, first["name"])
    got = [(s.key, s.label) for s in read_segment(source, Segment(first["name"], 1, 3))]
    assert got == everything[1:3]


def test_meta_from_folder_and_file_url_and_pickling(shard_set):
    for where in (shard_set.folder, f"file://{shard_set.folder}", f"{shard_set.folder}/"):
        source = ShardSource.of(where)
        assert source.read_meta() == shard_set.meta
    assert pickle.loads(pickle.dumps(source)) == source


def test_missing_meta_and_bad_json_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json: not found"):
        ShardSource.of(tmp_path).read_meta()
    (tmp_path / "meta.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        ShardSource.of(tmp_path).read_meta()
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="missing keys"):
        ShardSource.of(tmp_path).read_meta()


def test_truncated_shard_is_an_error_naming_it(tmp_path):
    shard_set = make_shards(tmp_path, {"train": 10}, samples_per_shard=10)
    name = shard_set.meta["splits"]["train"]["shards"][0]["name"]
    source = ShardSource.of(tmp_path)
    for fraction in (0.5, 0.81, 0.2):  # mid-data and at/near member boundaries
        make_shards(tmp_path, {"train": 10}, samples_per_shard=10)
        truncate_shard(tmp_path, name, fraction)
        with pytest.raises(ShardReadError, match=name) as err:
            list(read_segment(source, Segment(name, 0, 10)))
        assert err.value.shard == name
        # and the error survives pickling (it crosses from a Ray actor)
        again = pickle.loads(pickle.dumps(err.value))
        assert str(again) == str(err.value) and again.shard == name


def test_shard_cut_between_samples_is_caught_by_the_count(tmp_path):
    shard_set = make_shards(tmp_path, {"train": 10}, samples_per_shard=10)
    name = shard_set.meta["splits"]["train"]["shards"][0]["name"]
    truncate_shard(tmp_path, name, at_sample=6)
    with open(tmp_path / name, "rb") as f:
        assert len(list(iter_samples(f, name))) == 6  # tarfile alone sees a valid short tar
    with pytest.raises(ShardReadError, match=f"{name}: ended after 6 samples"):
        list(read_segment(ShardSource.of(tmp_path), Segment(name, 0, 10)))
    # a window that ends before the cut is still readable
    assert len(list(read_segment(ShardSource.of(tmp_path), Segment(name, 2, 6)))) == 4


def test_missing_shard_is_an_error_naming_it(tmp_path):
    make_shards(tmp_path, {"train": 4})
    with pytest.raises(ShardReadError, match="train-000099.tar: not found"):
        list(read_segment(ShardSource.of(tmp_path), Segment("train-000099.tar", 0, 1)))


def test_http_source(shard_set):
    name = shard_set.meta["splits"]["valid"]["shards"][-1]["name"]
    with serve_http(shard_set.folder) as url:
        source = ShardSource.of(url)
        assert source.read_meta() == shard_set.meta
        got = [(s.key, s.label) for s in read_segment(source, Segment(name, 0, 1))]
        with pytest.raises(FileNotFoundError, match="not found"):
            ShardSource.of(url + "/nothing-here").read_meta()
    assert got == webdataset_samples(shard_set.folder, name)[:1]


def test_s3_source(shard_set):
    name = shard_set.meta["splits"]["train"]["shards"][2]["name"]
    with serve_s3(shard_set.folder) as (url, options):
        source = ShardSource.of(url, options)
        assert source.read_meta() == shard_set.meta
        got = [(s.key, s.label) for s in read_segment(source, Segment(name, 0, 5))]
    assert got == webdataset_samples(shard_set.folder, name)
