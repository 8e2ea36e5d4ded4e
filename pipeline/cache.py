"""A local cache of remote shards: fetched once, verified, the least recently used evicted.

Layout: `CACHE/<16 hex digits of sha256(source URL)>/<shard name>`, so several data sets
share one cache and one limit, with `<shard>.lock` beside each shard and `CACHE/.lock`
for the whole cache. Every Ray actor and process on the machine opens its own
`ShardCache` over the same folder; `flock` locks keep them apart:

- reading a shard holds a shared lock on `<shard>.lock`, so it is never evicted mid-read;
- fetching holds the exclusive lock, so two actors wanting the same shard fetch it once
  (the second waits, then finds it there);
- making room holds `CACHE/.lock`, evicts the shards used longest ago (the access time,
  set on every use) whose lock is free, and reserves the new shard's full size at once
  (the temporary file is made that long), so the cache never holds more than the limit.
  When no room can be made (every cached shard is being read, or one shard is bigger than
  the limit) the shard is read from the network without caching, and the epoch goes on.

A fetch goes to `<shard>.part-<pid>-<random>`, is checked against `meta.json`'s size and
sha256, synced and renamed into place, so a crash never leaves a shard that looks whole.
A cached shard is checked again before use: its size every time, its sha256 the first
time a process opens it (or after the file changed), which catches a bit flip or a cut
at the cost of one read of the shard per process. A copy that fails is fetched again.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

CHUNK = 1 << 20
LOCK_SUFFIX = ".lock"
PART = ".part-"


class CacheMismatch(OSError):
    """A fetched shard whose size or sha256 differs from what `meta.json` lists."""


@dataclass(frozen=True)
class ShardCheck:
    """What `meta.json` says a shard is: its byte size and sha256."""

    size: int
    sha256: str


def shard_checks(meta: dict) -> dict[str, ShardCheck]:
    """Every shard's `ShardCheck` from `meta.json`, over all splits."""
    return {s["name"]: ShardCheck(int(s["bytes"]), s["sha256"])
            for split in meta["splits"].values() for s in split["shards"]
            if "bytes" in s and "sha256" in s}


class CachedShard:
    """A cached shard open for reading; holds the shard's shared lock until closed."""

    def __init__(self, file: BinaryIO, lock_fd: int):
        self.file, self._lock_fd = file, lock_fd

    def read(self, n: int = -1) -> bytes:
        return self.file.read(n)

    def close(self) -> None:
        self.file.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the shared lock
            self._lock_fd = -1

    def __enter__(self) -> CachedShard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _Entry:
    """A cached shard (and any fetches of it in progress) as the evictor sees it."""

    folder: Path
    shard: str
    last_use: float
    size: int
    paths: list = field(default_factory=list)


class ShardCache:
    """The cached shards of one source under `root`, at most `limit` bytes in `root` in all."""

    def __init__(self, root: str | Path, url: str, limit: int):
        self.root, self.url, self.limit = Path(root), url, limit
        self.folder = self.root / hashlib.sha256(url.encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        source_note = self.folder / ".source"  # for a person looking at the cache
        if not source_note.exists():
            source_note.write_text(url + "\n", encoding="utf-8")
        self.checks: dict[str, ShardCheck] | None = None  # from meta.json, loaded once
        self._checks_lock = threading.Lock()
        self._verified: dict[str, tuple] = {}  # shard -> file identity hashed in this process

    def load_checks(self, read_meta: Callable[[], dict]) -> dict[str, ShardCheck]:
        """What each shard must be, from `read_meta()` the first time (later calls wait for it).

        The lock is this cache's own: a read-ahead thread asking at the same time as its
        reader waits for the one `meta.json` read instead of making a second.
        """
        with self._checks_lock:
            if self.checks is None:
                self.checks = shard_checks(read_meta())
            return self.checks

    def open(self, name: str, check: ShardCheck, fetch: Callable[[], BinaryIO]
             ) -> CachedShard | None:
        """Shard `name` from the cache, fetched with `fetch()` first if missing or corrupt.

        None when the cache has no room for it (read it from the network instead).
        """
        if "/" in name or name.startswith(".") or name.endswith(LOCK_SUFFIX) or PART in name:
            raise ValueError(f"{name!r} cannot be cached: a shard name is a plain file name")
        lock = os.open(self.folder / f"{name}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_SH)
            file, problem = self._open_valid(name, check)
            if file is None:
                # one fetches, the others wait here and then find it; flock swaps the shared
                # lock for the exclusive one (not atomically, hence the second look)
                fcntl.flock(lock, fcntl.LOCK_EX)
                file, problem = self._open_valid(name, check)
                if file is None:
                    if problem != "missing":
                        log.warning("cached %s is %s; fetching it again", self.folder / name,
                                    problem)
                    file = self._fetch(name, check, fetch)
                fcntl.flock(lock, fcntl.LOCK_SH)
        except BaseException:
            os.close(lock)
            raise
        if file is None:
            os.close(lock)
            return None
        return CachedShard(file, lock)

    def _open_valid(self, name: str, check: ShardCheck) -> tuple[BinaryIO | None, str]:
        """The cached file if it is whole, else (None, what is wrong)."""
        path = self.folder / name
        try:
            file = open(path, "rb", buffering=CHUNK)
        except FileNotFoundError:
            return None, "missing"
        stat = os.fstat(file.fileno())
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if stat.st_size != check.size:
            file.close()
            return None, f"{stat.st_size} bytes, not {check.size} as meta.json lists"
        if self._verified.get(name) != identity:
            if file_sha256(file) != check.sha256:
                file.close()
                return None, "corrupt (its sha256 differs from meta.json's)"
            file.seek(0)
            self._verified[name] = identity
        os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))  # last use, for eviction
        return file, ""

    def _fetch(self, name: str, check: ShardCheck, fetch: Callable[[], BinaryIO]
               ) -> BinaryIO | None:
        """Download into a reserved temporary file, verify, rename; we hold `name`'s lock."""
        path = self.folder / name
        with self._whole_cache_locked():
            path.unlink(missing_ok=True)  # a bad copy; nobody reads it (we hold its lock)
            self._verified.pop(name, None)
            if not self._make_room(check.size, keep=(self.folder, name)):
                log.warning("cache %s: no room for %s (%d bytes, limit %d) beside the shards "
                            "being read; reading it without caching", self.root, name,
                            check.size, self.limit)
                return None
            part = self.folder / f"{name}{PART}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out = open(part, "wb")
            out.truncate(check.size)  # counts its full size while it fills
        try:
            with out, fetch() as src:
                digest, written = hashlib.sha256(), 0
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
                if written != check.size or digest.hexdigest() != check.sha256:
                    raise CacheMismatch(
                        f"fetched {self.url}/{name}: {written} bytes with sha256 "
                        f"{digest.hexdigest()[:16]}..., but meta.json lists {check.size} bytes "
                        f"with {check.sha256[:16]}...; the shard changed after meta.json was "
                        "written, re-run `tench shard`")
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        _fsync_folder(self.folder)
        file = open(path, "rb", buffering=CHUNK)
        stat = os.fstat(file.fileno())
        self._verified[name] = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return file

    def _whole_cache_locked(self):
        return _Flock(self.root / ".lock")

    def _make_room(self, size: int, keep: tuple) -> bool:
        """Evict least recently used, unlocked shards until `size` more bytes fit."""
        entries = scan(self.root)
        total = sum(e.size for e in entries)
        for entry in sorted(entries, key=lambda e: e.last_use):
            if total + size <= self.limit:
                break
            if (entry.folder, entry.shard) != keep and _evict(entry):
                total -= entry.size
                if entry.folder == self.folder:
                    self._verified.pop(entry.shard, None)
        return total + size <= self.limit


def scan(root: str | Path) -> list[_Entry]:
    """Every cached shard under `root`, with the bytes it holds (fetches in progress too)."""
    found: dict[tuple, dict] = {}
    for folder in Path(root).iterdir():
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            name = path.name
            if name.startswith(".") or name.endswith(LOCK_SUFFIX):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted or renamed meanwhile
                continue
            shard = name.split(PART, 1)[0]
            entry = found.setdefault((folder, shard), {"size": 0, "use": stat.st_atime,
                                                        "paths": []})
            entry["size"] += stat.st_size
            entry["paths"].append(path)
            if PART not in name:
                entry["use"] = stat.st_atime
    return [_Entry(folder, shard, e["use"], e["size"], e["paths"])
            for (folder, shard), e in found.items()]


def cache_size(root: str | Path) -> int:
    """Bytes held under the cache folder `root` (shards and fetches in progress)."""
    return sum(e.size for e in scan(root))


def _evict(entry: _Entry) -> bool:
    """Delete a shard unless someone reads or fetches it (its lock is taken)."""
    lock = os.open(entry.folder / f"{entry.shard}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        for path in entry.paths:
            path.unlink(missing_ok=True)
        return True
    finally:
        os.close(lock)


class _Flock:
    """An exclusive `flock` on a file, as a context manager."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def file_sha256(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def cache_for(root: str, url: str, limit: int) -> ShardCache:
    """This process's `ShardCache` for a source: one per (folder, URL, limit), kept.

    Not thread-safe on a first call: `pipeline.read_ahead` makes it in the reader's thread
    (`ShardSource.prepare_cache`) before any fetch thread starts.
    """
    return ShardCache(root, url, limit)
