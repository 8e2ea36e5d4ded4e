"""The shard format: what one record holds and what `meta.json` says.

Every side of tench (the sharder, the stream, the trainer) imports these names
instead of spelling keys and file names itself.

A shard is a webdataset-format tar file. One sample is four members sharing a key:
``<key>.<ext>`` (the image bytes, `ext` decided from the content), ``<key>.cls``
(the label index as ASCII decimal), ``<key>.json`` (``{"path", "label"}``) and
``<key>.crc32`` (``{ext: "8 hex digits"}``, the CRC32 of each other member), so a reader
can tell a damaged sample from a good one before decoding it. Format 1 shards lack the
``crc32`` member; they are still read, with nothing to verify.

Names that come from data are never trusted as paths: a shard name in `meta.json` must be
a plain file name (`check_file_name`), and sample paths are stored losslessly even when
they are not valid UTF-8 (Linux file names are bytes).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # 2: every sample carries a crc32 member
READABLE_VERSIONS = (1, 2)  # 1: as 2, without the crc32 member
META_NAME = "meta.json"
TRAIN, VALID = "train", "valid"  # the split names, here and nowhere else
SPLITS = (TRAIN, VALID)  # in shard-name and meta.json order
LABEL_EXT = "cls"
INFO_EXT = "json"
CHECKSUM_EXT = "crc32"
IMAGE_EXTS = ("jpg", "png", "webp", "gif", "bmp", "tiff")
MEMBER_EXTS = (*IMAGE_EXTS, LABEL_EXT, INFO_EXT, CHECKSUM_EXT)  # nothing else is a member
# A plain file name: no folders, no "..", nothing a URL would read as a query or escape.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
META_KEYS = ("format_version", "vocab", "vocab_fingerprint", "splits", "stats", "skipped")


class ShardFormatError(ValueError):
    """A shards folder or `meta.json` that tench cannot use."""


def shard_name(split: str, index: int) -> str:
    """`train-000000.tar`: the split then a zero-padded shard number."""
    return f"{split}-{index:06d}.tar"


def sample_key(rel_path: str) -> str:
    """A stable, unique key from the source path relative to SRC.

    A hash, because webdataset splits a member name at its first dot and keys must not
    hold dots or slashes; the path itself travels in the `json` member.
    """
    return hashlib.sha1(path_bytes(rel_path)).hexdigest()[:20]


def path_bytes(path: str) -> bytes:
    """The file name's bytes as the OS gave them: UTF-8, or the undecodable bytes kept as
    Python's `os.fsdecode` holds them (surrogate escapes), so no name is refused or lost."""
    return path.encode("utf-8", "surrogateescape")


def json_bytes(obj: Any, **options: Any) -> bytes:
    """`obj` as UTF-8 JSON; a string holding an undecodable file name (a lone surrogate)
    makes the whole document ASCII with `\\udcXX` escapes, which read back to that name."""
    try:
        return json.dumps(obj, ensure_ascii=False, **options).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **options).encode("ascii")


def shown(text: str) -> str:
    """`text` safe to print: an undecodable byte of a file name shows as `\\xff`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_file_name(name: Any, where: str = META_NAME) -> str:
    """Return `name` if it is a plain file name inside the shards folder, else raise.

    A shard name comes from `meta.json`, which anyone can edit: `/etc/passwd` or
    `../../x.tar` must never be opened, so this runs before anything is.
    """
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or ".." in name:
        raise ShardFormatError(
            f"{where}: shard name {name!r} is not a plain file name in the shards folder "
            "(letters, digits, '.', '_', '-'; no folders); refusing to open it")
    return name


def encode_label(index: int) -> bytes:
    return str(int(index)).encode("ascii")


def decode_label(data: bytes) -> int:
    return int(data.decode("ascii").strip())


def encode_info(rel_path: str, label: str) -> bytes:
    return json_bytes({"path": rel_path, "label": label})


def encode_checksums(members: dict[str, bytes]) -> bytes:
    """The crc32 member: `{ext: CRC32 as 8 hex digits}` of the sample's other members."""
    return json.dumps({ext: f"{zlib.crc32(data):08x}" for ext, data in members.items()}
                      ).encode("ascii")


CHECKSUM_SIZE = len(encode_checksums(dict.fromkeys(("tiff", LABEL_EXT, INFO_EXT), b"")))


def sample_members(key: str, ext: str, image: bytes, label_index: int, info: bytes) -> list:
    """The (member name, bytes) pairs of one sample, in the order they are written."""
    members = {ext: image, LABEL_EXT: encode_label(label_index), INFO_EXT: info}
    members[CHECKSUM_EXT] = encode_checksums(members)
    return [(f"{key}.{e}", data) for e, data in members.items()]


def split_member_name(name: str) -> tuple[str, str]:
    """`"dir/abc.JPG"` -> `("abc", "jpg")`: the sample key and the member's extension."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext.lower()


def sample_problem(members: dict[str, bytes]) -> str | None:
    """Why one sample's members (`{ext: bytes}`) are not a sample tench may use, or None.

    The one rule the stream and `tench inspect` share: exactly one image, a label and an
    info member, nothing else but the checksums, and (format 2) every member matching
    its CRC32, checked before anything is decoded.
    """
    unknown = sorted(ext for ext in members if ext not in MEMBER_EXTS)
    if unknown:
        return f"has members {unknown} that are not part of a tench sample"
    images = [ext for ext in members if ext in IMAGE_EXTS]
    if len(images) != 1:
        return f"has image members {images}, expected one"
    for ext in (LABEL_EXT, INFO_EXT):
        if ext not in members:
            return f"has no .{ext} member"
    return checksum_problem(members)


def checksum_problem(members: dict[str, bytes]) -> str | None:
    """A member whose CRC32 differs from the one stored when sharding, or None.

    No crc32 member (a format 1 shard): nothing to verify.
    """
    stored = members.get(CHECKSUM_EXT)
    if stored is None:
        return None
    try:
        sums = json.loads(stored)
    except ValueError:
        sums = None
    listed = set(members) - {CHECKSUM_EXT}
    if not isinstance(sums, dict) or set(sums) != listed:
        return f"has a damaged .{CHECKSUM_EXT} member (it should list {sorted(listed)})"
    for ext, want in sums.items():
        got = zlib.crc32(members[ext])
        if not isinstance(want, str) or f"{got:08x}" != want:
            return (f".{ext} member is damaged (crc32 {got:08x}, stored {want}); re-copy the "
                    "shard or re-run `tench shard`")
    return None


def validate_meta(meta: Any, where: str = META_NAME) -> dict:
    """Check the keys other tools rely on; return `meta` or raise naming what is wrong."""
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ShardFormatError(f"{where}: missing keys {missing}; re-run `tench shard`")
    if meta["format_version"] not in READABLE_VERSIONS:
        raise ShardFormatError(
            f"{where}: format_version {meta['format_version']!r}, this tench reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; re-run `tench shard` with this version"
        )
    for split, info in meta["splits"].items():
        if "count" not in info or "shards" not in info:
            raise ShardFormatError(f"{where}: split {split!r} lacks 'count' or 'shards'")
        for i, entry in enumerate(info["shards"]):
            if not isinstance(entry, dict) or "name" not in entry:
                raise ShardFormatError(f"{where}: split {split!r} shard {i} has no 'name'")
            check_file_name(entry["name"], f"{where}: split {split!r} shard {i}")
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
