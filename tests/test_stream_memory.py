"""ShardStream's memory: fixed by configuration, not by the data, and given back every epoch.

Three readings, each seeing what the others miss: the private heap (RssAnon) of this process
and its children (raylet, GCS, workers), where held data would pile up; the peak total RSS;
and Ray's object store's own count of the bytes and objects it holds, which sees a leak of a
few MB that the multi-GB RSS of the process tree hides.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from pipeline.stream import ShardStream

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)"),
]
MB = 1 << 20
KINDS = ("RssAnon", "VmRSS")
SIZE, BATCH, ACTORS, PREFETCH, PER_CALL = 128, 32, 2, 2, 1


# ---------------------------------------------------------------------- readings
def proc_memory(pid: int) -> dict | None:
    """Resident bytes by kind from `/proc/<pid>/status`; None for a process that has exited.

    Anything else unreadable, or a reading of zero, fails the test: a sampler that quietly
    read nothing would pass every bound.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        if not os.path.exists(f"/proc/{pid}"):
            return None  # exited between listing the tree and reading it
        raise
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if fields.get("State", "").strip()[:1] in ("Z", "X"):
        return None  # exited, not yet reaped: it holds no memory
    missing = [k for k in KINDS if k not in fields]
    if missing:  # no address space: exiting (released it, not yet a zombie), or broken
        if exits_soon(pid):
            return None
        raise AssertionError(f"/proc/{pid}/status has no {missing} and the process lives on: "
                             "cannot measure memory")
    out = {k: int(fields[k].split()[0]) << 10 for k in KINDS}  # kB
    if min(out.values()) <= 0:
        raise AssertionError(f"/proc/{pid}/status reads {out}: a live process holds memory")
    return out


def exits_soon(pid: int, timeout: float = 2.0) -> bool:
    """Whether `pid` is gone or a zombie within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]  # after "(command name)"
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


def tree_memory() -> tuple[int, int]:
    """(private heap, total RSS) of this process and its children: raylet, GCS, workers.

    The heap is steady to a few MB. The total also counts the torch libraries once per
    process and the pages of Ray's shared-memory object store as they are first touched.
    """
    me = psutil.Process()
    mine = proc_memory(me.pid)
    assert mine is not None
    children = [m for m in map(proc_memory, (p.pid for p in me.children(recursive=True))) if m]
    assert children, "no child process read: Ray's raylet and workers are not being measured"
    readings = [mine, *children]
    return sum(r["RssAnon"] for r in readings), sum(r["VmRSS"] for r in readings)


def object_store() -> tuple[int, int]:
    """(bytes, objects) in Ray's object store, as its raylet counts them.

    Ray has no public call for this (`ray.available_resources()["object_store_memory"]` is the
    scheduling budget, which does not move when objects are stored); this is what
    `ray memory --stats-only` prints.
    """
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    stats = get_memory_info_reply(state, timeout_seconds=10).store_stats
    assert stats.object_store_bytes_avail > 0, f"no object store reading: {stats}"
    return stats.object_store_bytes_used, stats.num_local_objects


def settled_store(limit: tuple[int, int], timeout: float = 10.0) -> tuple[int, int]:
    """The object store once it is back within `limit` (frees are asynchronous), or as it is
    when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        used = object_store()
        if (used[0] <= limit[0] and used[1] <= limit[1]) or time.monotonic() > deadline:
            return used
        time.sleep(0.02)


class Peaks:
    """Peak heap, total RSS and object-store bytes, sampled in a thread while a block runs;
    a failed reading fails the test instead of ending the thread quietly."""

    def __init__(self):
        self.heap = self.rss = self.store = 0
        self._done, self._error = threading.Event(), None

    def _watch(self) -> None:
        try:
            while not self._done.is_set():
                heap, rss = tree_memory()
                self.heap, self.rss = max(self.heap, heap), max(self.rss, rss)
                self.store = max(self.store, object_store()[0])
                time.sleep(0.005)
        except BaseException as e:  # handed to the test thread
            self._error = e

    def __enter__(self) -> Peaks:
        self._thread = threading.Thread(target=self._watch)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        if self._error is not None:
            raise self._error


def play(stream) -> Peaks:
    """One epoch consumed and dropped, like a training loop, under a `Peaks` sampler."""
    with Peaks() as peaks:
        n = sum(len(b) for b in stream)
    assert n == stream.num_samples
    assert peaks.heap > 0 and peaks.rss > peaks.heap and peaks.store > 0  # it really sampled
    return peaks


def test_a_process_that_exited_reads_as_none_and_this_one_as_memory():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its /proc entry is gone
    assert proc_memory(child.pid) is None
    mine = proc_memory(os.getpid())
    assert mine["RssAnon"] > MB and mine["VmRSS"] > mine["RssAnon"]


# ---------------------------------------------------------------------- the stream
@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """1x and 4x data: incompressible 144 px images decoded at 128 px, 300 samples (15 MB of
    pixels) and 1,200 (59 MB), so a stream that held on to its data would show it. Made in a
    subprocess so their pixels do not sit in this process's freed heap, where a leak could hide.
    """
    folder = tmp_path_factory.mktemp("grown")
    code = ("import sys; from tests.shard_fixtures import make_shards\n"
            "for scale in (1, 4):\n"
            "    make_shards(f'{sys.argv[1]}/x{scale}', {'train': 300 * scale}, "
            "image_size=(144, 136), noise=True, samples_per_shard=50, seed=scale)")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True,
                   cwd=Path(__file__).parent.parent)
    return folder


def open_stream(folder: Path) -> ShardStream:
    return ShardStream(folder, "train", batch_size=BATCH, size=SIZE, num_actors=ACTORS,
                       shuffle_buffer=64, prefetch=PREFETCH, batches_per_call=PER_CALL)


@pytest.fixture(scope="module")
def epochs_by_scale(ray_local, grown) -> dict:
    """Per data scale: (heap growth over one epoch, peak total RSS, peak object-store bytes),
    measured on the epoch after a warm-up one (imports, first allocations)."""
    results = {}
    for scale in (1, 4):
        with open_stream(grown / f"x{scale}") as stream:
            play(stream)
            before, _ = tree_memory()
            peaks = play(stream)
            results[scale] = (peaks.heap - before, peaks.rss, peaks.store)
    return results


def test_memory_is_flat_as_the_data_grows(epochs_by_scale):
    """4x the data must not raise the peaks: only configuration bounds memory."""
    (grow1, rss1, _), (grow4, rss4, _) = epochs_by_scale[1], epochs_by_scale[4]
    assert grow4 <= 1.3 * grow1 + 16 * MB, f"heap grew {grow1 / MB:.0f}, {grow4 / MB:.0f} MB"
    assert rss4 <= 1.15 * rss1, f"peak RSS 1x {rss1 / MB:.0f} MB, 4x {rss4 / MB:.0f} MB"


def test_object_store_holds_no_more_than_the_configured_batches(epochs_by_scale):
    """The prefetch window: `prefetch` objects in flight per actor plus the one being handed
    out, each `batches_per_call` batches. It holds only with released objects deleted at once
    (`pipeline.ray_setup.FREE_AT_ONCE`, which the fixture's Ray uses too): Ray's default
    batched free kept about a second of throughput, 13-58 MB here."""
    batch_bytes = BATCH * SIZE * SIZE * 3
    allowed = ACTORS * (PREFETCH + 1) * PER_CALL * batch_bytes + MB
    peaks = [epochs_by_scale[scale][2] for scale in (1, 4)]
    assert max(peaks) <= allowed, (
        f"object store peaks {peaks[0] / MB:.1f} MB at 1x, {peaks[1] / MB:.1f} MB at 4x; "
        f"the stream's configuration allows {allowed / MB:.1f} MB")


def test_object_store_and_heap_return_to_their_baseline_after_every_epoch(ray_local, grown):
    """A leak of one batch per epoch (1.5 MB) shows here within five epochs."""
    with open_stream(grown / "x1") as stream:
        play(stream)
        baseline = settled_store((0, 0), timeout=2.0)  # what the stream keeps between epochs
        heap0, _ = tree_memory()
        for epoch in range(1, 6):
            stream.set_epoch(epoch)
            assert play(stream).store > baseline[0]  # batches did pass through the store
            used = settled_store(baseline)
            assert used[0] <= baseline[0] and used[1] <= baseline[1], (
                f"epoch {epoch}: object store holds {used[0] / MB:.2f} MB in {used[1]} objects, "
                f"{baseline[0] / MB:.2f} MB in {baseline[1]} after the first epoch")
            heap, _ = tree_memory()
            assert heap <= heap0 + 16 * MB, (
                f"epoch {epoch}: heap {heap / MB:.0f} MB, {heap0 / MB:.0f} MB after the first")
