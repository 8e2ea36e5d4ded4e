"""Read-ahead of remote shards: an actor downloads its next shard while it decodes this one.

Without it each actor took turns: download a shard (or stream it, pausing the download
while decoding), decode it, then ask for the next one. `ReadAhead` walks one task's
segments and keeps a `ShardFetch` (a background thread) for the segment being read and
the one after it, never more, so the network and the decode overlap. The one after is not
fetched ahead when it reads the shard of the segment being read or the one before (a
shard split over segments, as mixes and resumed tasks do): that would download it twice.

- with a cache (`RemoteOptions.cache_dir`) the thread runs `ShardSource.open_shard`: the
  cache's locked, verified, atomic download of the whole shard, so two actors never fetch
  one shard twice, and it then holds the copy open (its shared lock), so the LRU cannot
  evict a shard that was fetched ahead before it is read: an actor holds two shards;
- without one (or when the cache has no room) the thread copies the download into an
  anonymous temporary file (`tempfile.TemporaryFile` in TMPDIR: unlinked at once, on disk,
  not in memory, gone with the process even when Ray kills it), at most `WINDOW` bytes
  ahead of its reader (a segment that ends early never costs the rest of the shard), and
  the reader reads that file as it fills, waiting for bytes not there yet.

A fetch that fails keeps its error: the reader gets the same exception when it reaches
that shard (at its first read, or where the bytes stop), so `read_segment` reports it as
it reports a direct read, naming the URL. Closing (the end of the task, or the task
dropped early) calls the download off (a `CallOff`: it breaks an HTTP read blocked on the
network) and waits for the thread; a thread still blocked (a connect, an s3 read) closes
its temporary file itself when it ends. Local shards are read in place: the page cache
reads ahead.
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
from pipeline.remote import CallOff
from pipeline.source import ShardSource

log = logging.getLogger(__name__)

CHUNK = 1 << 20
WINDOW = 64 << 20  # a temporary file's download runs at most this far ahead of its reader
AHEAD = 1  # segments fetched beyond the one being read
JOIN_S = 10.0  # at most this long to wait for a called-off download to let go


class _Spool:
    """An anonymous temporary file that one thread fills while another reads it.

    The filling waits while it is `window` bytes ahead of the reading. The file closes when
    both the filling thread and the fetch have let go (`release`, twice), so a thread still
    blocked in a network read never writes into a closed (and reused) file descriptor.
    """

    def __init__(self, window: int = WINDOW):
        self.file = tempfile.TemporaryFile(prefix="tench-shard-")
        self.window, self._fd = window, self.file.fileno()
        self._changed = threading.Condition()
        self._written = self._read_to = 0  # bytes in the file; the reader's position
        self._done = self._called_off = self.waiting = False
        self._error: BaseException | None = None
        self._holders = 2  # the filling thread and the fetch

    def fill(self, src: BinaryIO) -> None:
        """Copy `src` to the end or until called off; a read error is kept for the reader."""
        read = getattr(src, "read1", src.read)  # one network read: what came before a break
        try:
            with src:
                while self._wait_for_room() and (chunk := read(CHUNK)):
                    self._write(chunk)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, raised there
            self._error = e
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def _wait_for_room(self) -> bool:
        """Wait while `window` bytes ahead of the reader; False once called off."""
        with self._changed:
            while not self._called_off and self._written - self._read_to >= self.window:
                self.waiting = True
                self._changed.wait()
            self.waiting = False
            return not self._called_off

    def _write(self, chunk: bytes) -> None:
        view, at = memoryview(chunk), self._written
        while view:
            n = os.pwrite(self._fd, view, at)
            if n <= 0:
                raise OSError(f"temporary file for a shard: wrote nothing at byte {at}")
            view, at = view[n:], at + n
        with self._changed:
            self._written = at
            self._changed.notify_all()

    def read_at(self, position: int, n: int) -> bytes:
        """Up to `n` bytes from `position`, once there; b"" at the end; the download's error
        where its bytes stop."""
        with self._changed:
            self._read_to = position
            if self.waiting:
                self._changed.notify_all()
            while position >= self._written and not self._done:
                self._changed.wait()
            if position >= self._written:
                if self._error is not None:
                    raise self._error
                return b""
            n = min(n, self._written - position)
        return os.pread(self._fd, n, position)

    def call_off(self) -> None:
        """Stop filling (wakes a fill waiting for room)."""
        with self._changed:
            self._called_off = True
            self._changed.notify_all()

    def release(self) -> None:
        """One holder lets go; the last closes the file."""
        with self._changed:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.file.close()


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
    `window`: how far a temporary file's download may run ahead of its reader.
    """

    def __init__(self, source: ShardSource, name: str, window: int = WINDOW):
        self.source, self.name, self.window = source, name, window
        self._stop, self._ready = CallOff(), threading.Event()
        self._lock = threading.Lock()
        self._file: BinaryIO | CachedShard | None = None
        self._spool: _Spool | None = None
        self._error: BaseException | None = None
        self._taken = self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"read-ahead {name}",
                                        daemon=True)
        self._thread.start()

    @property
    def held_back(self) -> bool:
        """Whether its download is waiting for the reader (`window` bytes ahead of it)."""
        spool = self._spool
        return spool is not None and spool.waiting

    def _run(self) -> None:
        spool = None
        try:
            src = self.source.open_shard(self.name, stop=self._stop)
            if isinstance(src, CachedShard):
                if not self._keep(src):
                    src.close()
                return
            try:
                spool = _Spool(self.window)
            except BaseException:
                src.close()  # the temporary folder is full or gone: the download too
                raise
            if self._keep(io.BufferedReader(_SpoolReader(spool, self.close), CHUNK), spool):
                spool.fill(src)
                spool.release()
            else:  # closed meanwhile: nobody else knows this spool
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
        """Call the download off, wait (a while) for the thread, close what nobody took."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            untaken = None if self._taken else self._file
            spool = self._spool
            self._file = self._spool = None  # the reader refers back to this fetch
        self._stop.set()  # breaks an HTTP read waiting on the network
        if spool is not None:
            spool.call_off()
        if threading.current_thread() is not self._thread:
            self._thread.join(JOIN_S)
            if self._thread.is_alive():  # a connect or an s3 read; its spool waits for it
                log.warning("read-ahead of %s still winding down after %.0f s", self.name,
                            JOIN_S)
        if untaken is not None:
            untaken.close()  # a cached copy: releases its shared lock, the LRU may evict it
        if spool is not None:
            spool.release()


class ReadAhead:
    """One task's shard reads: each remote shard fetched while the one before is read."""

    def __init__(self, sources: Sequence[ShardSource], segments: Sequence[Segment],
                 window: int = WINDOW):
        self.sources, self.segments, self.window = list(sources), list(segments), window
        self._fetches: dict[int, ShardFetch] = {}
        for index in sorted({seg.source for seg in self.segments}):
            try:  # here, before any fetch thread: one ShardCache and one meta.json read
                self.sources[index].prepare_cache()
            except Exception:  # noqa: BLE001 - each fetch tries again, and fails where read
                log.debug("preparing the cache of %s failed", self.sources[index].url,
                          exc_info=True)

    def _shard(self, j: int) -> tuple[int, str]:
        return self.segments[j].source, self.segments[j].shard

    def opener(self, i: int) -> Callable[[], BinaryIO | CachedShard] | None:
        """What opens segment `i`'s shard for `read_segment` (None: open it in place).

        Starts the fetches of segment `i` and the `AHEAD` after it that are not running yet
        (but not one of the shard of segment `i` or `i - 1`), and forgets those before `i`
        (each closes with the reader it handed over).
        """
        for j in range(i, min(i + 1 + AHEAD, len(self.segments))):
            seg = self.segments[j]
            if j in self._fetches or self.sources[seg.source].is_local:
                continue
            if j > i and self._shard(j) in {self._shard(k) for k in range(max(i - 1, 0), j)}:
                break  # that shard is being read, or just was: no second download of it
            self._fetches[j] = ShardFetch(self.sources[seg.source], seg.shard, self.window)
        for j in [j for j in self._fetches if j < i]:
            self._fetches.pop(j).close()
        fetch = self._fetches.get(i)
        return fetch.open if fetch is not None else None

    def close(self) -> None:
        """End every fetch: downloads called off, threads joined, files closed."""
        fetches, self._fetches = list(self._fetches.values()), {}
        for fetch in fetches:
            fetch.close()
