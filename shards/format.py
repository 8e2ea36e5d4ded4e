"""The shard format: what one record holds and what `meta.json` says.

Every side of tench (the sharder, the stream, the trainer) imports these names
instead of spelling keys and file names itself.

A shard is a webdataset-format tar file. One sample is three members sharing a key:
``<key>.<ext>`` (the image bytes, `ext` decided from the content), ``<key>.cls``
(the label index as ASCII decimal) and ``<key>.json`` (``{"path", "label"}``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
META_NAME = "meta.json"
TRAIN, VALID = "train", "valid"  # the split names, here and nowhere else
SPLITS = (TRAIN, VALID)  # in shard-name and meta.json order
LABEL_EXT = "cls"
INFO_EXT = "json"
IMAGE_EXTS = ("jpg", "png", "webp", "gif", "bmp", "tiff")
META_KEYS = ("format_version", "vocab", "vocab_fingerprint", "splits", "stats", "skipped")


def shard_name(split: str, index: int) -> str:
    """`train-000000.tar`: the split then a zero-padded shard number."""
    return f"{split}-{index:06d}.tar"


def sample_key(rel_path: str) -> str:
    """A stable, unique key from the source path relative to SRC.

    A hash, because webdataset splits a member name at its first dot and keys must not
    hold dots or slashes; the path itself travels in the `json` member.
    """
    return hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:20]


def encode_label(index: int) -> bytes:
    return str(int(index)).encode("ascii")


def decode_label(data: bytes) -> int:
    return int(data.decode("ascii").strip())


def encode_info(rel_path: str, label: str) -> bytes:
    return json.dumps({"path": rel_path, "label": label}, ensure_ascii=False).encode("utf-8")


def sample_members(key: str, ext: str, image: bytes, label_index: int, info: bytes) -> list:
    """The (member name, bytes) pairs of one sample, in the order they are written."""
    return [
        (f"{key}.{ext}", image),
        (f"{key}.{LABEL_EXT}", encode_label(label_index)),
        (f"{key}.{INFO_EXT}", info),
    ]


class ShardFormatError(ValueError):
    """A shards folder or `meta.json` that tench cannot use."""


def validate_meta(meta: Any, where: str = META_NAME) -> dict:
    """Check the keys other tools rely on; return `meta` or raise naming what is wrong."""
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ShardFormatError(f"{where}: missing keys {missing}; re-run `tench shard`")
    if meta["format_version"] != FORMAT_VERSION:
        raise ShardFormatError(
            f"{where}: format_version {meta['format_version']!r}, this tench reads "
            f"{FORMAT_VERSION}; re-run `tench shard` with this version"
        )
    for split, info in meta["splits"].items():
        if "count" not in info or "shards" not in info:
            raise ShardFormatError(f"{where}: split {split!r} lacks 'count' or 'shards'")
    return meta


def read_meta(folder: str | Path) -> dict:
    """Read and validate `meta.json` from a local shards folder."""
    path = Path(folder) / META_NAME
    if not path.exists():
        raise ShardFormatError(f"{path}: not found; is {folder} a folder made by `tench shard`?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from e
    return validate_meta(meta, str(path))
