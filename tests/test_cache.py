"""The shard cache: fetched once, verified, evicted least recently used, shared safely.

Shards are served by a request-counting HTTP server on 127.0.0.1 and read through
`ShardSource`/`read_segment`, as an actor reads them; every read is compared with the
same shard read from disk. One test runs a `ShardStream` on Ray.
"""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from pipeline.cache import cache_for, cache_size
from pipeline.plan import Segment
from pipeline.remote import RemoteOptions
from pipeline.source import ShardReadError, ShardSource, read_segment
from tests.http_faults import serve_faulty
from tests.shard_fixtures import make_shards

pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 30}, samples_per_shard=5,
                       noise=True)


def shards(shard_set) -> list[dict]:
    return shard_set.meta["splits"]["train"]["shards"]


def read_all(source: ShardSource, entries: list[dict], check=None) -> list:
    out = []
    for shard in entries:
        out += [(s.key, s.data) for s in read_segment(source, Segment(shard["name"], 0,
                                                                      shard["count"]))]
        if check:
            check()
    return out


def cached_source(url: str, folder, limit="1GB") -> ShardSource:
    return ShardSource.of(url, remote=RemoteOptions(read_timeout=2, retries=1, backoff=0.05,
                                                    cache_dir=str(folder), cache_limit=limit))


def test_a_second_read_requests_no_shard(shard_set, server, tmp_path):
    expected = read_all(ShardSource.of(shard_set.folder), shards(shard_set))
    source = cached_source(server.url, tmp_path / "cache")
    assert read_all(source, shards(shard_set)) == expected
    assert server.count(".tar") == len(shards(shard_set))
    cache_for.cache_clear()  # a new process: it checks each file's sha256 once, from disk
    assert read_all(source, shards(shard_set)) == expected
    assert server.count(".tar") == len(shards(shard_set))
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*/*.tar"))
    assert cached == sorted(s["name"] for s in shards(shard_set))
    assert not list((tmp_path / "cache").glob("*/*.part-*"))
    assert cache_size(tmp_path / "cache") == sum(s["bytes"] for s in shards(shard_set))


def test_a_limit_below_the_data_set_keeps_the_cache_under_it(shard_set, server, tmp_path):
    entries = shards(shard_set)
    limit = int(2.5 * max(s["bytes"] for s in entries))
    assert limit < sum(s["bytes"] for s in entries)
    expected = read_all(ShardSource.of(shard_set.folder), entries)
    source = cached_source(server.url, tmp_path / "cache", limit)
    sizes = []
    for _ in range(2):  # two epochs, each whole
        assert read_all(source, entries, lambda: sizes.append(cache_size(tmp_path / "cache"))
                        ) == expected
    assert max(sizes) <= limit
    assert len(list((tmp_path / "cache").glob("*/*.tar"))) == 2
    # least recently used goes first: the last two shards read are the ones kept
    kept = sorted(p.name for p in (tmp_path / "cache").glob("*/*.tar"))
    assert kept == [entries[-2]["name"], entries[-1]["name"]]


def test_a_shard_being_read_is_never_evicted(shard_set, server, tmp_path):
    first, second = shards(shard_set)[:2]
    limit = int(1.5 * max(first["bytes"], second["bytes"]))  # room for one shard
    source = cached_source(server.url, tmp_path / "cache", limit)
    reading = read_segment(source, Segment(first["name"], 0, first["count"]))
    next(reading)  # an actor is mid-way through the first shard
    expected = read_all(ShardSource.of(shard_set.folder), [second])
    assert read_all(source, [second]) == expected  # read without caching: no room
    names = [p.name for p in (tmp_path / "cache").glob("*/*.tar")]
    assert names == [first["name"]] and cache_size(tmp_path / "cache") <= limit
    assert len(list(reading)) == first["count"] - 1
    assert read_all(source, [second]) == expected  # now the first one may go
    assert [p.name for p in (tmp_path / "cache").glob("*/*.tar")] == [second["name"]]


def test_a_corrupt_cached_shard_is_fetched_again(shard_set, server, tmp_path):
    shard = shards(shard_set)[0]
    expected = read_all(ShardSource.of(shard_set.folder), [shard])
    source = cached_source(server.url, tmp_path / "cache")
    read_all(source, [shard])
    path = next((tmp_path / "cache").glob(f"*/{shard['name']}"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped in the middle of a sample
    path.write_bytes(bytes(data))
    cache_for.cache_clear()  # the next process to open it checks its sha256
    assert read_all(source, [shard]) == expected
    assert server.count(shard["name"]) == 2
    path.write_bytes(path.read_bytes()[:-700])  # truncated: the size catches it at once
    assert read_all(source, [shard]) == expected
    assert server.count(shard["name"]) == 3
    assert path.read_bytes() == (shard_set.folder / shard["name"]).read_bytes()


def test_a_shard_that_differs_from_meta_json_is_refused_and_not_kept(shard_set, tmp_path):
    served = tmp_path / "served"
    make_shards(served, {"train": 30}, samples_per_shard=5, noise=True)
    name = shards(shard_set)[1]["name"]
    data = bytearray((served / name).read_bytes())
    data[700] ^= 0x01  # the server's copy changed after meta.json was written
    (served / name).write_bytes(bytes(data))
    with serve_faulty(served) as srv:
        source = cached_source(srv.url, tmp_path / "cache")
        with pytest.raises(ShardReadError, match=f"{name}.*sha256.*re-run `tench shard`"):
            list(read_segment(source, Segment(name, 0, 1)))
    left = [p.name for p in (tmp_path / "cache").glob("*/*.tar*")]
    assert left == [f"{name}.lock"]  # no shard, no partial fetch


def test_two_readers_of_one_shard_fetch_it_once(shard_set, server, tmp_path):
    shard = shards(shard_set)[0]
    server.fail(shard["name"], ("delay", 0.5))  # the first fetch is slow; the second waits
    expected = read_all(ShardSource.of(shard_set.folder), [shard])
    source = cached_source(server.url, tmp_path / "cache")
    results = [None, None]

    def read(i):
        results[i] = read_all(source, [shard])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [expected, expected]
    assert server.count(shard["name"]) == 1


def read_in_process(url: str, cache: str, entries: list[dict]) -> int:
    return len(read_all(cached_source(url, cache), entries))


def test_several_processes_share_one_cache(shard_set, server, tmp_path):
    entries = shards(shard_set)
    server.fail(entries[0]["name"], ("delay", 0.3))  # all three want it while it is fetched
    # fork: the children start at once (spawn would import torch and Ray in each, ~15 s)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        counts = pool.starmap(read_in_process,
                              [(server.url, str(tmp_path / "cache"), entries)] * 3)
    assert counts == [shard_set.meta["splits"]["train"]["count"]] * 3
    assert server.count(".tar") == len(entries)  # each shard fetched once, by one of them


def test_a_stream_reads_the_network_only_in_its_first_epoch(ray_local, shard_set, server,
                                                           tmp_path):
    from pipeline.stream import ShardStream

    every_key = set(shard_set.labels["train"])
    # 2 actors, batches of 4 across shards of 5: neighbouring actors share a shard
    with ShardStream(server.url, "train", batch_size=4, size=32, num_actors=2, shuffle=False,
                     cache_dir=str(tmp_path / "cache"), read_timeout=5) as stream:
        first = [k for b in stream for k in b.keys]
        fetched = server.count(".tar")
        second = [k for b in stream for k in b.keys]
    assert fetched == len(shards(shard_set))  # one GET per shard, the shared one included
    assert server.count(".tar") == fetched  # the second epoch requested no shard
    assert first == second and sorted(first) == sorted(every_key)

    limit = int(2.5 * max(s["bytes"] for s in shards(shard_set)))
    with ShardStream(server.url, "train", batch_size=4, size=32, num_actors=2,
                     cache_dir=str(tmp_path / "small"), cache_limit=limit) as stream:
        for _ in range(2):
            keys = [k for b in stream for k in b.keys]
            assert sorted(keys) == sorted(every_key)  # whole, each sample once
            assert cache_size(tmp_path / "small") <= limit
