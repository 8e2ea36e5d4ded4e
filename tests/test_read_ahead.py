"""Read-ahead of remote shards (`pipeline.read_ahead`) through a real `ShardReader`, and
its parts (`ShardFetch`, `ReadAhead`) where one step must be held still.

Shards come from a request-logging HTTP server on 127.0.0.1 (`tests.http_faults`). The
tests check the order of events, not timings: the next shard's GET arrives while the
reader is paused inside the shard before it; a fetch that failed in the background is
reported when its shard is reached; closing leaves no thread, temporary file or partial
cache file behind; a download stays a window ahead of its reader (the server's count of
bytes sent). Every read is compared with the same read from disk.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import threading
import time

import pytest

from pipeline.actors import ShardReader
from pipeline.plan import ActorTask, Segment
from pipeline.read_ahead import CHUNK, JOIN_S, ReadAhead, ShardFetch
from pipeline.remote import CallOff, RemoteOptions
from pipeline.source import ShardReadError, ShardSource, read_segment
from pipeline.transforms import valid_tfms
from tests.http_faults import serve_faulty
from tests.shard_fixtures import make_shards

pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):  # 14 shards of about 6 samples
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 85}, samples_per_shard=5,
                       noise=True)


def names(shard_set) -> list[str]:
    return [s["name"] for s in shard_set.meta["splits"]["train"]["shards"]]


def remote(url: str, cache=None, **options) -> ShardSource:
    options = {"read_timeout": 2, "retries": 1, "backoff": 0.05, **options}
    return ShardSource.of(url, remote=RemoteOptions(
        cache_dir=None if cache is None else str(cache), **options))


def task(segments: list[Segment], batch: int) -> ActorTask:
    total = sum(len(s) for s in segments)
    sizes = (batch,) * (total // batch) + ((total % batch,) if total % batch else ())
    return ActorTask(0, tuple(segments), sizes, seed=0, epoch=0)


def counts(shard_set) -> dict[str, int]:
    return {s["name"]: s["count"] for s in shard_set.meta["splits"]["train"]["shards"]}


def whole(shard_set, *shards: str) -> list[Segment]:
    return [Segment(name, 0, counts(shard_set)[name]) for name in shards]


def keys(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("read-ahead")]


def unlinked_temp_files() -> set[str]:
    """This process's open, unlinked files in the temporary folder (only /proc shows them;
    `TemporaryFile` makes them with `O_TMPFILE`, so they have no name of their own)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tempfile.gettempdir()) and target.endswith("(deleted)"):
            found.add(target)
    return found


_BEFORE: set[str] = set()


@pytest.fixture(autouse=True)
def temp_files_before():
    """pytest's output capture holds unlinked temporary files too: they are not spools."""
    _BEFORE.clear()
    _BEFORE.update(unlinked_temp_files())


def spool_files() -> set[str]:
    """Unlinked temporary files opened during this test and still open."""
    return unlinked_temp_files() - _BEFORE


MODES = ["no cache", "cache"]


def source_for(mode: str, url: str, tmp_path, **options) -> ShardSource:
    return remote(url, tmp_path / "cache" if mode == "cache" else None, **options)


@pytest.mark.parametrize("mode", MODES)
def test_the_next_shard_is_requested_while_this_one_is_read(mode, shard_set, server, tmp_path):
    first, second, third = names(shard_set)[:3]
    n = counts(shard_set)
    plan = task(whole(shard_set, first, second, third), batch=n[first] - 1)
    reader = ShardReader(source_for(mode, server.url, tmp_path))
    reader.start(plan, valid_tfms(32), "t")
    got = reader.next_batches("t", 1)  # 4 of the first shard's 5 samples: it is mid-shard
    assert wait_for(lambda: server.count(second) == 1)  # asked for while the reader waits
    if mode == "cache":  # fetched, verified and in place before the reader reaches it
        assert wait_for(lambda: any((tmp_path / "cache").glob(f"*/{second}")))
    assert server.count(third) == 0  # one shard ahead, no more
    got += reader.next_batches("t", plan.num_batches)
    expected = keys(run_on_disk(shard_set, plan))
    assert keys(got) == expected and len(expected) == n[first] + n[second] + n[third]
    assert [server.count(n) for n in (first, second, third)] == [1, 1, 1]
    assert not read_ahead_threads() and not spool_files()


def run_on_disk(shard_set, plan: ActorTask) -> list:
    reader = ShardReader(ShardSource.of(shard_set.folder))
    reader.start(plan, valid_tfms(32), "d")
    return reader.next_batches("d", plan.num_batches)


@pytest.mark.parametrize("mode", MODES)
def test_split_shards_give_every_sample_once(mode, shard_set, server, tmp_path):
    a, b, c, d = names(shard_set)[3:7]
    segments = [Segment(a, 2, 5), Segment(b, 0, 5), Segment(c, 1, 3), Segment(d, 0, 2)]
    plan = task(segments, batch=3)
    reader = ShardReader(source_for(mode, server.url, tmp_path))
    reader.start(plan, valid_tfms(32), "t")
    got = keys(reader.next_batches("t", plan.num_batches))
    assert got == keys(run_on_disk(shard_set, plan)) and len(got) == 3 + 5 + 2 + 2
    assert not read_ahead_threads() and not spool_files()


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_read_ahead_is_reported_when_its_shard_is_reached(mode, shard_set, server,
                                                                   tmp_path):
    first, second, third = names(shard_set)[7:10]
    server.fail(second, ("status", 500), ("status", 500))  # retries=1: both attempts fail
    n = counts(shard_set)
    plan = task(whole(shard_set, first, second, third), batch=n[first])
    reader = ShardReader(source_for(mode, server.url, tmp_path))
    reader.start(plan, valid_tfms(32), "t")
    assert len(keys(reader.next_batches("t", 1))) == n[first]  # the first shard, whole
    assert wait_for(lambda: server.count(second) == 2)  # failed in the background by now
    with pytest.raises(ShardReadError) as err:
        reader.next_batches("t", 1)
    message = str(err.value)
    assert f"shard {second}" in message and f"{server.url}/{second}" in message
    assert "failed 2 times" in message and "HTTP 500" in message
    assert wait_for(lambda: not read_ahead_threads()) and not spool_files()

    server.fail(second, ("status", 500), ("status", 500))
    skipping = ShardReader(source_for(mode, server.url, tmp_path / "2"), on_error="skip")
    skipping.start(plan, valid_tfms(32), "s")
    batches = skipping.next_batches("s", plan.num_batches)
    skips = [s for b in batches for s in b.skips]
    assert [(s.shard, s.count) for s in skips] == [(second, n[second])]
    assert f"{server.url}/{second}" in skips[0].reason
    # the third shard's samples follow the first's; the slots left at the end are refilled
    on_disk = keys(run_on_disk(shard_set, task(whole(shard_set, first, third), 4)))
    assert keys(batches)[:len(on_disk)] == on_disk
    assert sum(b.padded for b in batches) == n[second]


@pytest.mark.parametrize("mode", MODES)
def test_a_task_dropped_mid_download_leaves_nothing_behind(mode, shard_set, server, tmp_path):
    first, second, third = names(shard_set)[10:13]
    server.fail(second, *[("stall", 1000, None)] * 60)  # each attempt: quiet until the end
    # without the call-off, 50 retries of a 0.5 s timeout would keep the thread for 25 s+
    source = source_for(mode, server.url, tmp_path, read_timeout=0.5, retries=50)
    reader = ShardReader(source)
    plan = task(whole(shard_set, first, second, third), batch=2)
    reader.start(plan, valid_tfms(32), "t")
    reader.next_batches("t", 1)
    assert wait_for(lambda: server.count(second) >= 1)
    if mode == "no cache":
        assert spool_files()  # the spools exist while the task runs
    else:
        assert wait_for(lambda: any((tmp_path / "cache").glob(f"*/{second}.part-*")))
    started = time.monotonic()
    reader.start(task(whole(shard_set, third), batch=5), valid_tfms(32), "u")  # drops task "t"
    assert time.monotonic() - started < 5
    assert not read_ahead_threads() and not spool_files()
    assert not list(tmp_path.glob("**/*.part-*"))
    assert len(keys(reader.next_batches("u", 1))) == 5


def test_a_shard_fetched_ahead_is_not_evicted_before_it_is_read(shard_set, server, tmp_path):
    first, second, third, fourth = names(shard_set)[:4]
    sizes = {s["name"]: s["bytes"] for s in shard_set.meta["splits"]["train"]["shards"]}
    limit = sizes[first] + sizes[second] + sizes[third] // 2  # room for two shards
    reader = ShardReader(remote(server.url, tmp_path / "cache", cache_limit=limit))
    plan = task(whole(shard_set, first, second), batch=2)
    reader.start(plan, valid_tfms(32), "t")
    got = reader.next_batches("t", 1)  # mid-way through the first; the second fetched ahead
    assert wait_for(lambda: any((tmp_path / "cache").glob(f"*/{second}")))
    # another reader of the same cache wants room: neither held shard may go
    other = remote(server.url, tmp_path / "cache", cache_limit=limit)
    for name in (third, fourth):
        count = counts(shard_set)[name]
        assert len(list(read_segment(other, Segment(name, 0, count)))) == count
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*/*.tar"))
    assert cached == sorted([first, second])
    got += reader.next_batches("t", plan.num_batches)
    assert keys(got) == keys(run_on_disk(shard_set, plan))
    assert server.count(second) == 1


def sample_ends(shard_path) -> list[int]:
    """Where each sample's last member ends in the tar (padded), in order."""
    ends: dict[str, int] = {}
    with tarfile.open(shard_path) as tar:
        for member in tar.getmembers():
            key = member.name.rsplit(".", 1)[0]
            ends[key] = member.offset_data + -(-member.size // 512) * 512
    return list(ends.values())


@pytest.mark.parametrize("retries", [1, 0])
def test_a_download_that_breaks_mid_shard_resumes_where_it_broke(retries, shard_set, server):
    name = next(s["name"] for s in shard_set.meta["splits"]["train"]["shards"]
                if s["count"] >= 4)
    count = counts(shard_set)[name]
    cut = sample_ends(shard_set.folder / name)[2]  # samples 0, 1 and 2 arrive whole
    go_on = threading.Event()
    server.fail(name, ("hold", cut, go_on))  # then the connection drops, once
    source = remote(server.url, retries=retries)
    fetch = ShardFetch(source, name)
    samples = read_segment(source, Segment(name, 0, count), fetch.open)
    taken = [next(samples).key for _ in range(2)]  # the third is seen once the fourth starts
    assert server.ranges(name) == [None]  # the reader is part-way in, the download held
    go_on.set()
    on_disk = [s.key for s in read_segment(ShardSource.of(shard_set.folder),
                                           Segment(name, 0, count))]
    if retries:
        assert taken + [s.key for s in samples] == on_disk  # every sample, once
        assert server.ranges(name) == [None, f"bytes={cut}-"]  # resumed where it broke
    else:
        with pytest.raises(ShardReadError) as err:
            list(samples)
        message = str(err.value)
        assert f"{server.url}/{name}" in message and f"at byte {cut}" in message
        assert "broke off after 2 samples" in message  # the third waited for the fourth
    assert wait_for(lambda: not read_ahead_threads()) and not spool_files()


def test_a_download_runs_at_most_a_window_ahead_of_its_reader(tmp_path):
    window, slack = 2 << 20, 8 << 20  # slack: what the client socket's kernel buffer holds
    data = os.urandom(window + CHUNK + slack + (16 << 20))
    (tmp_path / "big.tar").write_bytes(data)
    with serve_faulty(tmp_path) as srv:
        srv.send_buffer = 64 << 10  # the server's socket buffer holds little
        fetch = ShardFetch(remote(srv.url), "big.tar", window=window)
        reader = fetch.open()  # the reader waits at the start
        assert wait_for(lambda: fetch.held_back)
        assert srv.sent("big.tar") <= window + CHUNK + slack
        got = reader.read(5 << 20)  # reading on lets it go on
        got += reader.read()
        reader.close()
        assert got == data and srv.sent("big.tar") == len(data)  # one download, whole
    assert not read_ahead_threads() and not spool_files()


@pytest.mark.parametrize("mode", MODES)
def test_closing_breaks_a_read_blocked_on_a_quiet_server(mode, shard_set, server, tmp_path):
    name = names(shard_set)[0]
    server.fail(name, ("stall", 100, None))  # 100 bytes, then quiet until the server stops
    fetch = ShardFetch(source_for(mode, server.url, tmp_path, read_timeout=60, retries=0),
                       name)
    assert wait_for(lambda: server.sent(name) == 100)
    started = time.monotonic()
    fetch.close()  # without breaking the read: JOIN_S of waiting, then a thread left behind
    assert time.monotonic() - started < JOIN_S / 2
    assert not read_ahead_threads() and not spool_files()
    assert not list(tmp_path.glob("**/*.part-*"))


def test_no_second_download_of_a_shard_being_read(shard_set, server):
    a, b = names(shard_set)[:2]
    n = counts(shard_set)[a]
    hold = threading.Event()  # every GET sends its headers, then waits: threads stay alive
    for name in (a, b):
        server.fail(name, *[("hold", 0, hold)] * 4)
    segments = [Segment(a, 0, 2), Segment(a, 2, 4), Segment(b, 0, 2), Segment(a, 4, n)]
    ahead = ReadAhead([remote(server.url)], segments)
    try:
        ahead.opener(0)  # not the next: it is the same shard
        assert [t.name for t in read_ahead_threads()] == [f"read-ahead {a}"]
        ahead.opener(1)  # the first closed; the next is another shard
        assert sorted(t.name for t in read_ahead_threads()) == [f"read-ahead {a}",
                                                                f"read-ahead {b}"]
        ahead.opener(2)  # not the next: it is the shard read just before
        assert [t.name for t in read_ahead_threads()] == [f"read-ahead {b}"]
    finally:
        hold.set()
        ahead.close()
    assert not read_ahead_threads()


def test_a_called_off_read_is_a_shard_read_error(shard_set, server):
    name = names(shard_set)[0]
    source, stop = remote(server.url), CallOff()
    stop.set()
    with pytest.raises(ShardReadError) as err:  # not ReadCancelled: skip mode can skip it
        list(read_segment(source, Segment(name, 0, 2), lambda: source.open(name, stop=stop)))
    assert "was called off" in str(err.value) and f"{server.url}/{name}" in str(err.value)
