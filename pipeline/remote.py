"""Reading a remote file that survives a bad network: bounded waits, retries, resume.

A `RetryingReader` is a sequential binary reader over one URL. Every attempt has a connect
and a read timeout, so a server that stops sending costs `read_timeout`, never forever.
A broken attempt (timeout, reset, a body cut short, HTTP 5xx/429/408) is retried after
an exponential backoff (`backoff`, 2x, 4x ..., at most `BACKOFF_CAP` s) and resumes at
the byte where it broke (an HTTP `Range` request, a seek on object stores), so a retry
never loses or repeats a byte. After `retries` retries the read fails with a
`RemoteReadError` naming the URL, the shard, the attempts and the last cause.

HTTP goes through `requests` (explicit timeouts, `Range`); other fsspec protocols (s3)
through fsspec with s3fs's own timeouts set from the same options.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import requests
import urllib3

CONNECT_TIMEOUT = 10.0  # s, at most; never more than read_timeout
BACKOFF_CAP = 30.0  # s, the longest wait between two attempts
REMOTE_BLOCK = 4 << 20  # read-ahead per open file on object stores: bounded, not a whole file
CHUNK = 1 << 20
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like "50GB", "512 MiB", "1e9" (GB = 10^9, GiB = 2^30)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size in bytes or like '50GB', got {value!r}")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else "?"
        if unit not in _UNITS:
            raise ValueError(f"expected a size in bytes or like '50GB' or '512MiB', got {value!r}")
        number = float(match.group(1))
    size = int(number * _UNITS[unit])
    if size < 0:
        raise ValueError(f"a size must not be negative, got {value!r}")
    return size


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read and kept, checked when made.

    - `read_timeout`: seconds one attempt may wait for the next bytes (and, up to
      `CONNECT_TIMEOUT`, for a connection).
    - `retries`: further attempts after a failed one, each after a backoff of `backoff` s,
      doubling, at most `BACKOFF_CAP` s. With the defaults a server that never sends again
      fails the read after 6 x 20 s + 1+2+4+8+16 s = 151 s (`worst_case_wait()`).
    - `cache_dir`: None reads remote shards straight from the network every epoch; a folder
      keeps them there (`pipeline.cache`), verified, at most `cache_limit` bytes in all
      (an int or a string like "50GB").
    """

    read_timeout: float = 20.0
    retries: int = 5
    backoff: float = 1.0
    cache_dir: str | None = None
    cache_limit: int | str = "50GB"

    def __post_init__(self) -> None:
        for name in ("read_timeout", "backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if self.read_timeout <= 0:
            raise ValueError(f"read_timeout must be more than 0 s, got {self.read_timeout!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, Path)) or not str(self.cache_dir):
                raise ValueError(f"cache_dir must be a folder path or None, got "
                                 f"{self.cache_dir!r}")
            object.__setattr__(self, "cache_dir", str(Path(self.cache_dir).expanduser()))
        object.__setattr__(self, "cache_limit", parse_size(self.cache_limit))

    @property
    def connect_timeout(self) -> float:
        return min(CONNECT_TIMEOUT, self.read_timeout)

    def delay(self, retry: int) -> float:
        """The wait before retry number `retry` (1, 2, ...)."""
        return min(self.backoff * 2 ** (retry - 1), BACKOFF_CAP)

    def worst_case_wait(self) -> float:
        """Seconds until a read from a server that never sends again gives up."""
        waits = sum(self.delay(r) for r in range(1, self.retries + 1))
        return (self.retries + 1) * self.read_timeout + waits


class RemoteReadError(OSError):
    """A remote read that failed on every attempt, or for good (4xx)."""


class ReadCancelled(OSError):
    """A read stopped on purpose (its `stop` event was set); never retried.

    An `OSError`, so a reader that meets it reports it like any other failed read
    (`read_segment`'s `ShardReadError`) and skip mode skips, never crashes.
    """


class CallOff(threading.Event):
    """A `stop` event that also breaks the network reads waiting under it.

    `set()` sets the event (each watching `RetryingReader` raises `ReadCancelled` at its next
    step) and shuts the socket of the HTTP body each one is reading, so a read blocked on a
    quiet server returns now, not after `read_timeout`. Not broken: a connect or a wait for
    a response's headers, and object-store (s3fs) reads; those end within their timeouts.
    """

    def __init__(self):
        super().__init__()
        self._guard = threading.Lock()
        self._readers: weakref.WeakSet = weakref.WeakSet()

    def watch(self, reader: RetryingReader) -> None:
        with self._guard:
            self._readers.add(reader)
        if self.is_set():
            reader.interrupt()

    def set(self) -> None:
        super().set()
        with self._guard:
            readers = list(self._readers)
        for reader in readers:
            reader.interrupt()


class TransientError(OSError):
    """One attempt broke in a way that a later attempt may not (a 5xx, a body cut short)."""


# what a retry may fix: network errors, timeouts, 5xx; a 404 or 403 is final
_TRANSIENT = (TransientError, ConnectionError, TimeoutError, requests.ConnectionError,
              requests.Timeout, requests.exceptions.ChunkedEncodingError,
              urllib3.exceptions.HTTPError, EOFError)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, PermissionError, RemoteReadError, ReadCancelled)):
        return False
    if isinstance(error, _TRANSIENT):
        return True
    return isinstance(error, OSError) and not isinstance(error, requests.HTTPError)


class _HttpBody:
    """One HTTP GET from `offset` on, with timeouts; `read(n)` returns b"" only at the end."""

    def __init__(self, session: requests.Session, url: str, offset: int,
                 options: RemoteOptions):
        headers = {"Accept-Encoding": "identity"}  # byte offsets must mean file offsets
        if offset:
            headers["Range"] = f"bytes={offset}-"
        self.response = session.get(url, stream=True, headers=headers,
                                    timeout=(options.connect_timeout, options.read_timeout))
        status = self.response.status_code
        if status == 404:
            self.close()
            raise FileNotFoundError(f"{url}: not found (HTTP 404)")
        if status in _RETRY_STATUS:
            self.close()
            raise TransientError(f"the server answered HTTP {status} {self.response.reason}")
        if status not in (200, 206):
            self.close()
            raise RemoteReadError(f"{url}: HTTP {status} {self.response.reason}")
        self.size = None
        if status == 206:
            span, _, total = self.response.headers.get("Content-Range", "").partition("/")
            if not span.removeprefix("bytes ").startswith(f"{offset}-"):
                self.close()
                raise RemoteReadError(f"{url}: asked for bytes from {offset}, got {span!r}")
            self.size = int(total) if total.isdigit() else None
        elif "Content-Length" in self.response.headers:
            self.size = int(self.response.headers["Content-Length"])
        if status == 200 and offset:  # the server ignored Range: read past what we have
            self.skip(offset)

    def skip(self, n: int) -> None:
        while n > 0:
            data = self.read(min(n, CHUNK))
            if not data:
                raise TransientError(f"body ended {n} bytes before the resume point")
            n -= len(data)

    def read(self, n: int) -> bytes:
        # read1: what has arrived (one socket read), so bytes received before a stall are
        # handed over and counted, and a retry resumes after them
        return self.response.raw.read1(n)

    def interrupt(self) -> None:
        """Make a `read` blocked in another thread return now (urllib3 >= 2.3 can)."""
        with contextlib.suppress(Exception):  # released, closed, or an older urllib3
            self.response.raw.shutdown()

    def close(self) -> None:
        self.response.close()


class _FsspecBody:
    """An fsspec file (s3, gcs, ...) from `offset` on; s3fs's timeouts come from the options."""

    def __init__(self, url: str, offset: int, storage_options: dict, options: RemoteOptions):
        fs, path = fsspec.core.url_to_fs(url, **with_timeouts(url, storage_options, options))
        self.file = fs.open(path, "rb", block_size=REMOTE_BLOCK)
        self.size = getattr(self.file, "size", None)
        if offset:
            self.file.seek(offset)

    def read(self, n: int) -> bytes:
        return self.file.read(n)

    def interrupt(self) -> None:
        """Nothing: an s3fs read cannot be broken from outside; it ends within its timeouts."""

    def close(self) -> None:
        self.file.close()


def with_timeouts(url: str, storage_options: dict, options: RemoteOptions) -> dict:
    """`storage_options` plus botocore timeouts for s3 URLs, unless the user set their own."""
    if not url.startswith(("s3://", "s3a://")):
        return storage_options
    merged = dict(storage_options)
    config = dict(merged.get("config_kwargs") or {})
    config.setdefault("connect_timeout", options.connect_timeout)
    config.setdefault("read_timeout", options.read_timeout)
    merged["config_kwargs"] = config
    return merged


class RetryingReader(io.RawIOBase):
    """A sequential reader of `url` that retries a broken read from the byte it reached.

    `size`: the expected length when known (a shard's from `meta.json`), so a body that
    ends early is a break to retry even when the server sent no length. `stop`: an event
    that, once set, makes the next read (or the backoff wait) raise `ReadCancelled`, so a
    background download can be called off (`pipeline.read_ahead`); a `CallOff` also breaks
    the HTTP read in progress (`interrupt`).
    """

    def __init__(self, url: str, options: RemoteOptions, *, shard: str | None = None,
                 size: int | None = None, storage_options: dict | None = None,
                 stop: threading.Event | None = None):
        super().__init__()
        self.url, self.options, self.shard, self.size = url, options, shard, size
        self.stop = stop
        self.storage_options = storage_options or {}
        self.position, self.attempts = 0, 0
        self._session = None
        if url.startswith(("http://", "https://")):
            self._session = requests.Session()  # fsspec's http `headers` option still applies
            self._session.headers.update(self.storage_options.get("headers") or {})
        self._body = None
        self._sleep: Callable[[float], None] = time.sleep
        if isinstance(stop, CallOff):
            stop.watch(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        while True:
            self._check_stop()
            try:
                if self._body is None:
                    self._body = self._open_body()
                    self._check_stop()  # called off while connecting: `interrupt` missed it
                data = self._body.read(n)
                if not data:
                    self._check_stop()  # an interrupted read looks like the end
                    if self.size is not None and self.position < self.size:
                        raise TransientError(f"body ended at byte {self.position} of "
                                             f"{self.size}")
                self.position += len(data)
                return data
            except Exception as e:  # noqa: BLE001 - sorted into final and transient below
                self._drop_body()
                if not is_transient(e):
                    raise
                self._check_stop()  # a break the call-off made is not retried
                self._wait_or_give_up(e)

    def _open_body(self):
        self.attempts += 1
        if self._session is not None:
            body = _HttpBody(self._session, self.url, self.position, self.options)
        else:
            body = _FsspecBody(self.url, self.position, self.storage_options, self.options)
        if self.size is None and body.size is not None:
            self.size = body.size
        return body

    def _wait_or_give_up(self, error: Exception) -> None:
        retry = self.attempts  # the retry that comes next
        if retry > self.options.retries:
            raise RemoteReadError(
                f"{self.url}: reading {self.shard or 'it'} failed {self.attempts} times (retries="
                f"{self.options.retries}, read_timeout={self.options.read_timeout:g} s), the "
                f"last at byte {self.position}: {type(error).__name__}: {error}") from error
        if self.stop is None:
            self._sleep(self.options.delay(retry))
        else:
            self.stop.wait(self.options.delay(retry))

    def interrupt(self) -> None:
        """Break the network read in progress, if any; called from another thread."""
        body = self._body
        if body is not None:
            body.interrupt()

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise ReadCancelled(f"{self.url}: reading {self.shard or 'it'} was called off")

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        if self._session is not None:
            self._session.close()
        super().close()


def open_remote(url: str, options: RemoteOptions, *, shard: str | None = None,
                size: int | None = None, storage_options: dict | None = None,
                stop: threading.Event | None = None) -> io.BufferedReader:
    """A buffered `RetryingReader` (tar headers are read 512 bytes at a time)."""
    raw = RetryingReader(url, options, shard=shard, size=size, storage_options=storage_options,
                         stop=stop)
    return io.BufferedReader(raw, buffer_size=CHUNK)
