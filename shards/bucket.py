"""`tench shard SRC s3://bucket/prefix`: shards written straight to object storage.

The shards are made in a local staging folder as usual; each is uploaded as soon as it is
complete (then its local copy is dropped), and `meta.json` goes last, so a reader never
sees a half-written data set: a prefix without `meta.json` is an unfinished run, and an
interrupted run leaves none. `force` clears only tench's own names under the prefix
(`meta.json` first, then `<split>-NNNNNN.tar`); anything else there is left alone.

Credentials and endpoint come from the standard AWS settings, read by s3fs/botocore:
environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`,
...) or a profile (`AWS_PROFILE`, `~/.aws/config`).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import fsspec

from shards.format import META_NAME, SPLITS
from shards.shard_plan import ShardError

OWN_FILE = re.compile(rf"^(({'|'.join(SPLITS)})-\d{{6}}\.tar|{re.escape(META_NAME)})$")


class BucketOut:
    """An OUT in object storage (any fsspec URL but a local path): upload, finish, abort."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        try:
            # a fresh client: the AWS settings may have changed since one was cached
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True,
                                                       **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise ShardError(f"{self.url}: cannot write there ({e})") from None
        self.uploaded: list[str] = []

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self, force: bool) -> None:
        """Refuse a prefix that holds files (unless `force`: then clear tench's own ones)."""
        try:
            names = sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False,
                                                                      refresh=True))
        except FileNotFoundError:
            names = []
        except OSError as e:
            raise ShardError(f"{self.url}: cannot list OUT ({e})") from None
        if names and not force:
            raise ShardError(f"{self.url}: OUT is not empty ({len(names)} entries, e.g. "
                             f"{names[0]!r}); pass --force to replace an earlier run's shards "
                             "and meta.json, or pick an empty prefix")
        if META_NAME in names:
            self.fs.rm_file(self._path(META_NAME))  # first: the prefix stops looking complete
        for name in names:
            if OWN_FILE.match(name) and name != META_NAME:
                self.fs.rm_file(self._path(name))

    def upload(self, local: Path) -> None:
        """Upload one finished shard, then drop the local copy."""
        try:
            self.fs.put_file(str(local), self._path(local.name))
        except OSError as e:
            raise ShardError(f"{self.url}/{local.name}: upload failed ({e})") from e
        self.uploaded.append(local.name)
        local.unlink(missing_ok=True)

    def finish(self, meta: Path) -> None:
        """Upload `meta.json`: from now on the prefix is a complete data set."""
        try:
            self.fs.put_file(str(meta), self._path(META_NAME))
        except OSError as e:
            raise ShardError(f"{self.url}/{META_NAME}: upload failed ({e}); the shards are "
                             "there but unusable without it: re-run with --force") from e

    def abort(self) -> None:
        """Remove the shards this run uploaded (best effort; no meta.json was written)."""
        for name in self.uploaded:
            with contextlib.suppress(OSError):
                self.fs.rm_file(self._path(name))
