"""Write samples into size-capped tar shards that appear only when complete.

`ShardWriter` rolls to a new shard when the current one would pass `max_bytes`. Each
shard is written under a temporary name and renamed when closed, so an interrupted run
never leaves a shard that looks finished. It returns, per shard, the name, sample count,
byte size and sha256 that `meta.json` records.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shards.atomic import temp_path
from shards.format import sample_members, shard_name

TAR_BLOCK = 512


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return asdict(self)


class _HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def _member_size(n: int) -> int:
    """Bytes one member takes in a ustar/pax tar: header + data padded to the block."""
    return TAR_BLOCK + (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def sample_size(*payloads: bytes) -> int:
    return sum(_member_size(len(p)) for p in payloads)


class ShardWriter:
    """Write samples of one split into `folder/<split>-NNNNNN.tar`, `max_bytes` per shard.

    Use as a context manager; `shards` lists the finished `ShardInfo`s. A sample larger
    than `max_bytes` gets a shard of its own rather than being refused. `sync=False` skips
    the fsync before the rename, for a caller that fsyncs the shards itself later (before
    it writes `meta.json`) so the disk works while it goes on decoding.
    """

    def __init__(self, folder: str | Path, split: str, max_bytes: int, start_index: int = 0,
                 sync: bool = True):
        self.folder, self.split, self.max_bytes = Path(folder), split, int(max_bytes)
        self.sync = sync
        self.index = start_index
        self.shards: list[ShardInfo] = []
        self._tar = self._raw = self._hash = None
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # e.g. a full disk while writing the end of the shard
            self.abort()
            raise

    @property
    def in_progress(self) -> tuple[Path | None, int]:
        """The temporary file being written (None between shards) and its bytes so far."""
        if self._tar is None:
            return None, 0
        return Path(self._tmp), self._hash.size

    def write(self, key: str, ext: str, image: bytes, label_index: int, info: bytes) -> None:
        members = sample_members(key, ext, image, label_index, info)
        size = sum(_member_size(len(data)) for _, data in members)
        if self._tar is not None and self._count and self._hash.size + size > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._start()
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o444, 0
            self._tar.addfile(ti, io.BytesIO(data))
        self._count += 1

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file), keeping finished ones."""
        if self._tar is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails on a full disk
                self._raw.close()
            self._tar = None
            Path(self._tmp).unlink(missing_ok=True)

    def _start(self) -> None:
        self._name = shard_name(self.split, self.index)
        self._tmp = temp_path(self.folder / self._name)
        self._raw = open(self._tmp, "wb")
        self._hash = _HashingFile(self._raw)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
        self._raw.flush()
        if self.sync:
            os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self._tmp, self.folder / self._name)
        self.shards.append(ShardInfo(self._name, self._count, self._hash.size,
                                     self._hash.sha.hexdigest()))
        self._tar = None
        self.index += 1
