"""`tench shard SRC s3://bucket/prefix` against a local S3-compatible server (moto).

Credentials and endpoint come from the standard AWS environment variables only, as a
user's would; shards go up one by one, `meta.json` last.
"""

from __future__ import annotations

import json
import urllib.request

import fsspec
import pytest
import s3fs

from shards.remote import open_file
from shards.sharder import ShardError, shard_folder
from tests.test_sharder import make_tree
from trainer.cli import main as cli_main


@pytest.fixture()
def bucket(monkeypatch):
    """A moto S3 server on 127.0.0.1 with bucket `tench`; AWS_* variables point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in (("AWS_ENDPOINT_URL", f"http://{host}:{port}"),
                        ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    # moto keeps its buckets per process, across servers: start from none
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset",
                                                  method="POST")).close()
    s3fs.S3FileSystem.clear_instance_cache()  # instances of an earlier test's server
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.call_s3("create_bucket", Bucket="tench")
    yield fs
    server.stop()


def read_meta(url: str) -> dict:
    with open_file(url, "meta.json") as f:
        return json.loads(f.read())


def names(fs, prefix: str = "tench/data") -> list[str]:
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(prefix, detail=False)) \
        if fs.exists(prefix) else []


def test_shards_go_to_the_bucket_meta_json_last(tmp_path, bucket, capsys):
    make_tree(tmp_path / "src", train=4, valid=2)

    assert cli_main(["shard", str(tmp_path / "src"), "s3://tench/data", "--max-count", "3",
                     "--processes", "1"]) == 0
    assert "wrote s3://tench/data/meta.json" in capsys.readouterr().out
    listed = names(bucket)
    meta = read_meta("s3://tench/data")
    shards = [s["name"] for split in meta["splits"].values() for s in split["shards"]]
    assert listed == sorted([*shards, "meta.json"]) and len(shards) >= 4
    with open_file("s3://tench/data", shards[0]) as f:
        assert f.read(512)  # a real tar, readable back
    assert cli_main(["inspect", "s3://tench/data"]) == 0


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, bucket):
    make_tree(tmp_path / "src", train=4, valid=2)
    (tmp_path / "src" / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ShardError, match="--on-error fail"):
        shard_folder(tmp_path / "src", "s3://tench/data", on_error="fail", processes=1,
                     max_count=2, progress=False)
    assert names(bucket) == []  # the shards uploaded before the error are removed too


def test_force_replaces_only_tenchs_own_files(tmp_path, bucket):
    make_tree(tmp_path / "src", train=4, valid=2)
    bucket.pipe("tench/data/README.txt", b"mine")
    bucket.pipe("tench/data/train-000099.tar", b"an old run's shard")
    with pytest.raises(ShardError, match="not empty"):
        shard_folder(tmp_path / "src", "s3://tench/data", processes=1, progress=False)
    meta = shard_folder(tmp_path / "src", "s3://tench/data", processes=1, progress=False,
                        force=True)
    listed = names(bucket)
    assert "README.txt" in listed and "train-000099.tar" not in listed
    assert read_meta("s3://tench/data") == meta
