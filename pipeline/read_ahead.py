"""Read-ahead of remote shards: an actor downloads its next shard while it decodes this one.

Without it each actor took turns: download a shard (or stream it, pausing the download
while decoding), decode it, then ask for the next one. `ReadAhead` walks one task's
segments and keeps a `ShardFetch` (a background thread) for the segment being read and
the one after it, never more, so the network and the decode overlap:

- with a cache (`RemoteOptions.cache_dir`) the thread runs `ShardSource.open_shard`: the
  cache's locked, verified, atomic download, so two actors never fetch one shard twice,
  and it then holds the copy open (its shared lock), so the LRU cannot evict a shard that
  was fetched ahead before it is read;
- without one (or when the cache has no room) the thread copies the download into an
  anonymous temporary file (`tempfile.TemporaryFile`: unlinked at once, on disk, not in
  memory, gone with the process even when Ray kills it), and the reader reads that file
  as it fills, waiting for bytes not there yet.

A fetch that fails keeps its error: the reader gets the same exception when it reaches
that shard (at its first read, or where the bytes stop), so `read_segment` reports it as
it reports a direct read, naming the URL. Closing (the end of the task, or the task
dropped early) calls the downloads off (`RetryingReader`'s `stop` event), joins the
threads and closes the files. Local shards are read in place: the page cache reads ahead.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO

from pipeline.cache import CachedShard
from pipeline.plan import Segment
from pipeline.source import ShardSource

log = logging.getLogger(__name__)

CHUNK = 1 << 20
AHEAD = 1  # shards fetched beyond the one being read
JOIN_S = 10.0  # at most this long to wait for a called-off download to let go


class _Spool:
    """An anonymous temporary file that one thread fills while another reads it."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="tench-shard-")
        self._fd = self.file.fileno()
        self._changed = threading.Condition()
        self._written, self._done, self._error = 0, False, None

    def fill(self, src: BinaryIO, stop: threading.Event) -> None:
        """Copy `src` to the end or until `stop`; a read error is kept for the reader."""
        read = getattr(src, "read1", src.read)  # one network read: what came before a break
        try:
            with src:
                while not stop.is_set() and (chunk := read(CHUNK)):
                    os.pwrite(self._fd, chunk, self._written)
                    with self._changed:
                        self._written += len(chunk)
                        self._changed.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the reader, raised there
            self._error = e
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def read_at(self, position: int, n: int) -> bytes:
        """Up to `n` bytes from `position`, once there; b"" at the end; the download's error
        where its bytes stop."""
        with self._changed:
            while position >= self._written and not self._done:
                self._changed.wait()
            if position >= self._written:
                if self._error is not None:
                    raise self._error
                return b""
            n = min(n, self._written - position)
        return os.pread(self._fd, n, position)


class _SpoolReader(io.RawIOBase):
    """A sequential reader of a `_Spool`; closing it ends its fetch."""

    def __init__(self, spool: _Spool, on_close: Callable[[], None]):
        super().__init__()
        self._spool, self._on_close, self._position = spool, on_close, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._spool.read_at(self._position, len(buffer))
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._on_close()
        super().close()


class ShardFetch:
    """One remote shard, fetched by a background thread from the moment this is made.

    `open()` hands over a reader (waiting for the cache's download when there is a cache)
    or raises what the fetch raised; `close()` calls the fetch off and cleans up.
    """

    def __init__(self, source: ShardSource, name: str):
        self.source, self.name = source, name
        self._stop, self._ready = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._file: BinaryIO | CachedShard | None = None
        self._spool: _Spool | None = None
        self._error: BaseException | None = None
        self._taken = self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"read-ahead {name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            src = self.source.open_shard(self.name, stop=self._stop)
            if isinstance(src, CachedShard):
                if not self._keep(src):
                    src.close()
                return
            spool = _Spool()
            if self._keep(io.BufferedReader(_SpoolReader(spool, self.close), CHUNK), spool):
                spool.fill(src, self._stop)
            else:
                src.close()
                spool.file.close()
        except BaseException as e:  # noqa: BLE001 - raised by open(), in the reader's thread
            self._error = e
        finally:
            self._ready.set()

    def _keep(self, file: BinaryIO | CachedShard, spool: _Spool | None = None) -> bool:
        """Hold `file` for `open()`; False when this fetch was closed meanwhile."""
        with self._lock:
            if self._closed:
                return False
            self._file, self._spool = file, spool
            self._ready.set()
            return True

    def open(self) -> BinaryIO | CachedShard:
        """The shard's reader, once there is one; the fetch's error if it failed first."""
        self._ready.wait()
        with self._lock:
            if self._file is None:
                raise self._error or RuntimeError(f"read-ahead of {self.name} was closed")
            self._taken = True
            return self._file

    def close(self) -> None:
        """Call the download off, wait for the thread, close what nobody took."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            untaken = None if self._taken else self._file
            spool = self._spool
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(JOIN_S)
            if self._thread.is_alive():  # blocked in a read; it stops at the next one
                log.warning("read-ahead of %s still winding down after %.0f s", self.name,
                            JOIN_S)
        if isinstance(untaken, CachedShard):
            untaken.close()  # releases its shared lock: the LRU may evict it again
        if spool is not None:
            spool.file.close()


class ReadAhead:
    """One task's shard reads: each remote shard fetched while the one before is read."""

    def __init__(self, sources: Sequence[ShardSource], segments: Sequence[Segment]):
        self.sources, self.segments = list(sources), list(segments)
        self._fetches: dict[int, ShardFetch] = {}

    def opener(self, i: int) -> Callable[[], BinaryIO | CachedShard] | None:
        """What opens segment `i`'s shard for `read_segment` (None: open it in place).

        Starts the fetches of segment `i` and the `AHEAD` after it that are not running yet,
        and forgets those before `i` (each closes with the reader it handed over).
        """
        for j in range(i, min(i + 1 + AHEAD, len(self.segments))):
            seg = self.segments[j]
            if j not in self._fetches and not self.sources[seg.source].is_local:
                self._fetches[j] = ShardFetch(self.sources[seg.source], seg.shard)
        for j in [j for j in self._fetches if j < i]:
            self._fetches.pop(j).close()
        fetch = self._fetches.get(i)
        return fetch.open if fetch is not None else None

    def close(self) -> None:
        """End every fetch: downloads called off, threads joined, files closed."""
        fetches, self._fetches = list(self._fetches.values()), {}
        for fetch in fetches:
            fetch.close()
