"""Where shards live: `meta.json` and shard bytes from a folder or URL, streamed, never extracted.

A `ShardSource` is a base location (a local folder, `file://`, `http(s)://`, `s3://` or
anything else fsspec knows) plus fsspec `storage_options`. It is a small picklable value,
so each Ray actor opens and reads its own shards; no shard bytes pass through the driver.

Remote sources read through `pipeline.remote` (timeouts, retries that resume where a read
broke) and, with `RemoteOptions.cache_dir`, through a local cache (`pipeline.cache`).

Shards are read front to back (`pipeline.tarstream`, a stream reader like `tarfile`'s
`r|` mode): nothing is extracted or unpickled, and a segment that ends early stops
reading there. (An actor's `ShardReader` reads remote shards through `pipeline.read_ahead`,
which fetches its next shard meanwhile: whole into the cache, or, without one, into an
unlinked temporary file at most `read_ahead.WINDOW` bytes ahead of the reader, so a
segment that ends early costs at most that much more.) A tar cut at a header reads
as a short, valid archive, so every read is checked against the sample counts in
`meta.json`; a short shard is a `ShardReadError`. Every sample is checked by
`shards.format.sample_problem` (its members, and their CRC32s in format 2) before anything
decodes it; a damaged sample arrives as a `RawSample` with its `problem` set, so the reader
can fail or skip that sample alone. Shard names are checked to be plain file names before
anything is opened.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pipeline.cache import CachedShard, ShardCache, cache_for
from pipeline.plan import Segment
from pipeline.remote import RemoteOptions, RemoteReadError, open_remote
from pipeline.tarstream import TarFormatError, iter_tar
from shards.format import (
    IMAGE_EXTS,
    LABEL_EXT,
    META_NAME,
    check_file_name,
    decode_label,
    sample_problem,
    split_member_name,
    validate_meta,
)
from shards.remote import HttpError, http_status


class ShardReadError(Exception):
    """A shard that could not be read: missing, truncated, or holding a malformed sample."""

    def __init__(self, shard: str, reason: str):
        super().__init__(f"shard {shard}: {reason}")
        self.shard, self.reason = shard, reason

    def __reduce__(self):  # so the error crosses from a Ray actor intact
        return (type(self), (self.shard, self.reason))


@dataclass(frozen=True)
class RawSample:
    """One sample as stored: encoded image bytes, their extension, the label index.

    `problem` says why the sample must not be used (damaged, malformed); then `data` is
    empty and `label` is -1. `source`: which of a stream's sources it came from.
    """

    shard: str
    key: str
    ext: str
    data: bytes
    label: int
    problem: str | None = None
    source: int = 0


@dataclass(frozen=True)
class ShardSource:
    """A shards folder or URL holding `meta.json`, plus fsspec options to reach it.

    Object stores take their settings from `storage_options`, e.g. an S3-compatible
    server: `{"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}`;
    without them s3fs uses the usual AWS environment variables and config files.
    `remote` sets the timeouts, retries and cache of a remote source (a local one ignores it).
    """

    url: str
    storage_options: dict = field(default_factory=dict)
    remote: RemoteOptions = field(default_factory=RemoteOptions)

    @classmethod
    def of(cls, source: str | Path | ShardSource, storage_options: dict | None = None,
           remote: RemoteOptions | None = None) -> ShardSource:
        """A source from a path or URL; a `ShardSource` as it is, with `remote` if given."""
        if isinstance(source, ShardSource):
            return source if remote is None else dataclasses.replace(source, remote=remote)
        url = str(source)
        if "://" not in url:
            url = str(Path(url).expanduser().resolve())
        return cls(url.rstrip("/"), dict(storage_options or {}), remote or RemoteOptions())

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def read_meta(self) -> dict:
        """`meta.json`, validated; errors say which URL and what to do."""
        where = self.url_of(META_NAME)
        try:
            with self.open(META_NAME) as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError as e:
            status = http_status(e)
            if status is not None and status != 404:
                raise OSError(f"{where}: the server answered HTTP {status}") from None
            raise FileNotFoundError(
                f"{where}: not found; is {self.url} a folder made by `tench shard`?") from None
        except (HttpError, RemoteReadError) as e:
            raise OSError(f"{where}: the download failed ({e})") from None
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        return validate_meta(meta, where)

    def open(self, name: str, size: int | None = None, stop: threading.Event | None = None
             ) -> BinaryIO:
        """A sequential binary reader for one file under the source, straight from it.

        Remote reads time out and retry from the byte they reached (`pipeline.remote`);
        `size`, when known, makes a body that ends early a break to retry; setting `stop`
        calls a remote read off (`ReadCancelled`).
        """
        check_file_name(name, f"{self.url}: file")
        if self.is_local:
            return open(Path(self.url) / name, "rb", buffering=1 << 20)
        return open_remote(self.url_of(name), self.remote, shard=name, size=size,
                           storage_options=self.storage_options, stop=stop)

    def prepare_cache(self) -> ShardCache | None:
        """This process's cache of the source with its shard checks loaded (one `meta.json`
        read per process); None for a local source or without `cache_dir`.

        `pipeline.read_ahead` calls it in the reader's thread before it starts any fetch
        thread, so the threads share one `ShardCache` and one read of `meta.json`.
        """
        if self.is_local or self.remote.cache_dir is None:
            return None
        cache = cache_for(self.remote.cache_dir, self.url, self.remote.cache_limit)
        cache.load_checks(self.read_meta)
        return cache

    def open_shard(self, name: str, stop: threading.Event | None = None
                   ) -> BinaryIO | CachedShard:
        """A reader for shard `name`: from the cache when one is set, else as `open`.

        With a cache this returns once the shard is there (fetched and verified if need be).
        """
        cache = self.prepare_cache()
        if cache is None:
            return self.open(name, stop=stop)
        check = cache.checks.get(name)
        if check is None:
            raise ShardReadError(name, f"meta.json at {self.url} lists no size and sha256 for "
                                       "it, so it cannot be cached; re-run `tench shard`")
        cached = cache.open(name, check, lambda: self.open(name, check.size, stop))
        return cached if cached is not None else self.open(name, check.size, stop)


def iter_samples(f: BinaryIO, shard: str) -> Iterator[RawSample]:
    """Stream the samples of one open shard, grouping `<key>.<ext>` members by key.

    Raises `ShardReadError` for a tar that cannot be parsed or a sample missing its
    image or label; the caller checks the count against `meta.json`.
    """
    key, members = None, {}
    try:
        for name, data in iter_tar(f):
            k, ext = split_member_name(name)
            if not ext:
                continue
            if k != key:
                if key is not None:
                    yield _sample(shard, key, members)
                key, members = k, {}
            members[ext] = data
    except TarFormatError as e:
        raise ShardReadError(shard, f"not a readable tar ({e}); re-run `tench shard`") from e
    if key is not None:
        yield _sample(shard, key, members)


def _sample(shard: str, key: str, members: dict) -> RawSample:
    problem = sample_problem(members)  # checksums first: nothing damaged is decoded
    if problem is None:
        try:
            label = decode_label(members[LABEL_EXT])
        except ValueError as e:
            problem = f"has a bad label ({e})"
    if problem is not None:
        return RawSample(shard, key, "", b"", -1, problem)
    ext = next(ext for ext in members if ext in IMAGE_EXTS)
    return RawSample(shard, key, ext, members[ext], label)


def read_segment(source: ShardSource, segment: Segment,
                 opened: Callable[[], BinaryIO] | None = None) -> Iterator[RawSample]:
    """Samples `[start, stop)` of one shard; skipped samples are read past, not decoded.

    Stops reading at `stop` (closing the download), and raises `ShardReadError` if the
    shard ends before `stop` — a truncated shard never passes for a short one. `opened`:
    what opens the shard instead of `source.open_shard` (a read-ahead's fetch,
    `pipeline.read_ahead`); its errors are reported like those of a direct read.
    """
    index = 0
    try:
        with (opened or functools.partial(source.open_shard, segment.shard))() as f:
            for sample in iter_samples(f, segment.shard):
                if index >= segment.start:
                    yield sample
                index += 1
                if index >= segment.stop:
                    return
    except ShardReadError:
        raise
    except FileNotFoundError as e:
        status = http_status(e)
        if status is not None and status != 404:
            raise ShardReadError(segment.shard, f"the server answered HTTP {status} for "
                                 f"{source.url_of(segment.shard)}") from e
        raise ShardReadError(segment.shard, f"not found under {source.url}") from e
    except (HttpError, RemoteReadError) as e:
        raise ShardReadError(segment.shard, f"the download broke off after {index} samples "
                             f"({e})") from e
    except (OSError, EOFError) as e:
        raise ShardReadError(segment.shard, f"read failed after {index} samples ({e})") from e
    raise ShardReadError(
        segment.shard,
        f"ended after {index} samples but meta.json lists at least {segment.stop}; "
        "the shard is truncated or was replaced, re-run `tench shard`")
