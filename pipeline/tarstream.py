"""Read the regular files of a tar front to back: `(name, bytes)`, nothing extracted.

Why not `tarfile`: building a `TarInfo` per member costs about 50 us in Python (`bench/
kernel_bench.py` prints both readers' cost), three
members per sample, which was a quarter of an actor's time per image. This reader parses
only what a shard needs (name, size, type) from ustar, pax and GNU headers, checks each
header's checksum like `tarfile` does, and skips anything that is not a regular file
(directories, links, devices) without following it. The tests read the same tars with
`tarfile` as the oracle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular, contiguous file


class TarFormatError(ValueError):
    """Bytes that are not a well-formed tar (bad header checksum, cut short)."""


def _read(f: BinaryIO, n: int) -> bytes:
    """Exactly `n` bytes (network streams may return fewer per call), or fewer at EOF."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = _read(f, n)
    if len(data) != n:
        raise TarFormatError(f"unexpected end of data in {what} ({len(data)} of {n} bytes)")
    return data


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """An octal ASCII number, or GNU base-256 when the high bit of the first byte is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError("bad number in a header (corrupt or not a tar)") from None


def _check_sum(header: bytes) -> None:
    stored = _number(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != unsigned:  # a few old tars sum signed bytes
        signed = unsigned - 256 * (sum(1 for b in header[:148] + header[156:] if b > 127))
        if stored != signed:
            raise TarFormatError("bad header checksum (corrupt or not a tar)")


def _pax_records(data: bytes) -> dict:
    """`"%d key=value\\n"` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_tar(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield `(name, data)` for every regular file, in order.

    Ends quietly at the end-of-archive block or at EOF on a header boundary (like
    `tarfile` in stream mode), so callers must check counts to catch a shard cut between
    members; a cut anywhere else raises `TarFormatError`.
    """
    long_name = pax = None
    while True:
        header = _read(f, BLOCK)
        if not header or header == _ZERO:
            return
        if len(header) < BLOCK:
            raise TarFormatError(f"unexpected end of data in a header ({len(header)} bytes)")
        _check_sum(header)
        kind = header[156:157]
        size = _number(header[124:136])
        if pax and "size" in pax:
            size = int(pax["size"])
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L"):
            data = _exact(f, padded, "an extended header")[:size]
            if kind == b"x":
                try:
                    pax = _pax_records(data)
                except ValueError as e:
                    raise TarFormatError(f"bad pax header ({e})") from None
            elif kind == b"L":
                long_name = _text(data)
            continue
        if kind not in _REGULAR:  # directory, link, device, GNU extras: skip the payload
            _exact(f, padded, "a skipped member")
            long_name = pax = None
            continue
        name = _text(header[0:100])
        if header[257:262] == b"ustar" and header[345] != 0:
            name = f"{_text(header[345:500])}/{name}"
        name = (pax or {}).get("path") or long_name or name
        data = _exact(f, padded, f"member {name}")
        yield name, data if padded == size else data[:size]
        long_name = pax = None
