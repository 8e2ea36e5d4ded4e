"""Open a file of a shards folder given as a local path or a URL, for `tench inspect`.

A location is a local folder or anything fsspec opens (`http(s)://`, `s3://` with its
usual environment settings, `file://`). Only plain file names (`check_file_name`) are
opened under it, so a name from `meta.json` cannot reach outside it. The stream has its
own reader (`pipeline.source.ShardSource`, with storage options); shards imports nothing
from pipeline, so both share only the rules here and in `shards.format`.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import fsspec
from aiohttp import ClientError as HttpError  # what fsspec's HTTP reads raise

from shards.format import check_file_name

__all__ = ["HttpError", "http_status", "is_url", "join", "open_file", "read_failure"]


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str | Path, name: str) -> str:
    """Where `name` lives under `location`, as the messages spell it."""
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location, name))


def open_file(location: str | Path, name: str) -> BinaryIO:
    """A sequential binary reader for `location/name`; FileNotFoundError when it is absent."""
    check_file_name(name, f"{location}: file")
    if not is_url(location):
        return open(Path(location, name), "rb", buffering=1 << 20)
    fs, path = fsspec.core.url_to_fs(join(location, name))
    block = 0 if fs.protocol[0] in ("http", "https") else 4 << 20  # streamed GET for HTTP
    return fs.open(path, "rb", block_size=block)


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind an error, or None when no response is behind it.

    fsspec reports every failed HTTP request (a 500 as much as a 404) as
    FileNotFoundError; the response's status survives in the exception chain.
    """
    seen: BaseException | None = error
    while seen is not None:
        status = getattr(seen, "status", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return None


def read_failure(error: BaseException) -> str:
    """A short sentence for a failed open or read: not found, an HTTP status, a broken
    download, or the OS's reason."""
    status = http_status(error)
    if isinstance(error, FileNotFoundError):
        if status is not None and status != 404:
            return f"the server answered HTTP {status}"
        return "not found"
    if isinstance(error, HttpError):
        return f"the download broke off ({error})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
