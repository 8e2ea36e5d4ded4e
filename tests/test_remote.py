"""Remote reads on a bad network: servers on 127.0.0.1 that stall, fail, and cut files short.

Every read is compared with the same shard read from disk, so a retry that lost or
repeated a byte would show as a different sample list (or a tar error).
"""

from __future__ import annotations

import time

import pytest

from pipeline.plan import Segment
from pipeline.remote import RemoteOptions, open_remote, parse_size
from pipeline.settings import StreamSettings
from pipeline.source import ShardReadError, ShardSource, read_segment
from tests.shard_fixtures import make_shards, serve_s3

FAST = RemoteOptions(read_timeout=0.5, retries=2, backoff=0.05)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    # noise images: each shard is ~100 KB, so a cut lands well inside it
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 12}, samples_per_shard=4,
                       noise=True, image_size=(160, 120))


def first_shard(shard_set) -> dict:
    return shard_set.meta["splits"]["train"]["shards"][0]


def samples(source: ShardSource, shard: dict) -> list:
    return [(s.key, s.ext, s.data, s.label)
            for s in read_segment(source, Segment(shard["name"], 0, shard["count"]))]


def test_a_stall_mid_shard_costs_one_retry_that_resumes_at_the_byte(shard_set, server):
    shard = first_shard(shard_set)
    expected = samples(ShardSource.of(shard_set.folder), shard)
    server.fail(shard["name"], ("stall", 30_000, 3.0))  # quiet for longer than read_timeout
    started = time.monotonic()
    got = samples(ShardSource.of(server.url, remote=FAST), shard)
    assert got == expected
    assert server.ranges(shard["name"]) == [None, "bytes=30000-"]
    assert time.monotonic() - started < 2.5  # the timeout, not the stall, set the wait


def test_a_connection_closed_mid_file_resumes_with_range(shard_set, server):
    shard = first_shard(shard_set)
    expected = samples(ShardSource.of(shard_set.folder), shard)
    server.fail(shard["name"], ("close", 12_345), ("close", 40_000))
    assert samples(ShardSource.of(server.url, remote=FAST), shard) == expected
    # the second attempt started at 12,345 and broke 40,000 bytes later
    assert server.ranges(shard["name"]) == [None, "bytes=12345-", "bytes=52345-"]


def test_500_then_200_and_503_are_retried(shard_set, server):
    shard = first_shard(shard_set)
    expected = samples(ShardSource.of(shard_set.folder), shard)
    server.fail(shard["name"], ("status", 500), ("status", 503))
    assert samples(ShardSource.of(server.url, remote=FAST), shard) == expected
    assert server.count(shard["name"]) == 3


def test_a_server_that_ignores_range_still_gives_every_byte_once(shard_set, server):
    shard = first_shard(shard_set)
    expected = samples(ShardSource.of(shard_set.folder), shard)
    server.ignore_range = True
    server.fail(shard["name"], ("close", 20_000))
    assert samples(ShardSource.of(server.url, remote=FAST), shard) == expected
    assert server.count(shard["name"]) == 2


def test_a_server_that_never_sends_again_fails_within_the_bound(shard_set, server):
    shard = first_shard(shard_set)
    server.fail(shard["name"], ("stall", 10_000, None), *[("stall", 0, None)] * 5)
    started = time.monotonic()
    with pytest.raises(ShardReadError) as err:
        samples(ShardSource.of(server.url, remote=FAST), shard)
    elapsed = time.monotonic() - started
    message = str(err.value)
    url = f"{server.url}/{shard['name']}"
    assert url in message and f"shard {shard['name']}" in message
    assert "failed 3 times" in message and "at byte 10000" in message
    assert "timed out" in message.lower()  # the cause
    assert server.count(shard["name"]) == 3  # retries=2: three attempts in all
    bound = FAST.worst_case_wait()  # 3 x 0.5 s + 0.05 + 0.1 s
    assert bound * 0.9 <= elapsed <= bound + 3


def test_the_default_bound_is_two_to_three_minutes():
    options = RemoteOptions()
    assert (options.read_timeout, options.retries) == (20.0, 5)
    assert [options.delay(r) for r in range(1, 6)] == [1, 2, 4, 8, 16]
    assert 120 <= options.worst_case_wait() <= 180
    assert options.worst_case_wait() == 6 * 20 + 31


def test_a_server_that_always_answers_503_fails_naming_it(shard_set, server):
    shard = first_shard(shard_set)
    server.fail(shard["name"], *[("status", 503)] * 10)
    with pytest.raises(ShardReadError, match="HTTP 503") as err:
        samples(ShardSource.of(server.url, remote=FAST), shard)
    assert "failed 3 times" in str(err.value)
    assert server.count(shard["name"]) == 3


def test_a_missing_file_is_not_retried(shard_set, server):
    with pytest.raises(ShardReadError, match="train-000099.tar: not found"):
        list(read_segment(ShardSource.of(server.url, remote=FAST),
                          Segment("train-000099.tar", 0, 1)))
    assert server.count("train-000099.tar") == 1


def test_meta_json_is_read_through_the_retries(shard_set, server):
    server.fail("meta.json", ("status", 500), ("close", 100))
    assert ShardSource.of(server.url, remote=FAST).read_meta() == shard_set.meta
    assert server.ranges("meta.json") == [None, None, "bytes=100-"]


def test_meta_json_that_never_comes_is_a_remote_read_error(server):
    server.fail("meta.json", *[("status", 500)] * 3)
    with pytest.raises(OSError, match=r"meta.json: reading meta.json failed 3 times.*HTTP 500"):
        ShardSource.of(server.url, remote=FAST).read_meta()


def test_an_early_end_without_a_length_is_caught_by_the_known_size(shard_set, server):
    shard = first_shard(shard_set)
    data = (shard_set.folder / shard["name"]).read_bytes()
    server.fail(shard["name"], ("close", 5000))
    with open_remote(f"{server.url}/{shard['name']}", FAST, shard=shard["name"],
                     size=shard["bytes"]) as f:
        assert f.read() == data


def test_s3_reads_resume_through_fsspec(shard_set):
    shard = first_shard(shard_set)
    expected = samples(ShardSource.of(shard_set.folder), shard)
    with serve_s3(shard_set.folder) as (url, options):
        source = ShardSource.of(url, options, remote=FAST)
        assert samples(source, shard) == expected


def test_options_are_checked():
    with pytest.raises(ValueError, match="read_timeout"):
        RemoteOptions(read_timeout=0)
    with pytest.raises(ValueError, match="retries"):
        RemoteOptions(retries=-1)
    with pytest.raises(ValueError, match="StreamSettings: retries"):
        StreamSettings(retries=1.5)
    with pytest.raises(ValueError, match="StreamSettings: expected a size"):
        StreamSettings(cache_limit="lots")
    settings = StreamSettings(read_timeout=5, retries=1, cache_dir="/tmp/c", cache_limit="2MiB")
    assert settings.remote() == RemoteOptions(5, 1, cache_dir="/tmp/c", cache_limit=2 << 20)
    assert [parse_size(v) for v in (123, "50GB", "1.5 kb", "2MiB")] == [
        123, 50 * 10**9, 1500, 2 << 20]
