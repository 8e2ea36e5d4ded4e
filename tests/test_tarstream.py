"""pipeline.tarstream: our tar reader against `tarfile` as the oracle, on tars written by
`tarfile` (ustar, pax, GNU), by webdataset's `TarWriter` and by tench; damage is refused."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset as wds

from pipeline.tarstream import BLOCK, TarFormatError, iter_tar
from tests.shard_fixtures import make_shards


def make_tar(fmt: int, members: dict, extras: bool = True) -> bytes:
    """A tar written by `tarfile` in `fmt`; `extras` adds a directory, a symlink, a hard link
    and (pax only) a global header among the files, all of which the reader must skip."""
    buf = io.BytesIO()
    globals_ = {"comment": "global header"} if extras and fmt == tarfile.PAX_FORMAT else None
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=globals_) as tar:
        if extras:
            d = tarfile.TarInfo("some/dir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("some/link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
            hard = tarfile.TarInfo("some/hard.jpg")
            hard.type, hard.linkname = tarfile.LNKTYPE, "abc.jpg"
            tar.addfile(hard)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tarfile_oracle(raw: bytes) -> list:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def with_checksum(header: bytearray, signed: bool = False) -> bytearray:
    """Store the header's checksum as `tarfile` writes it, or as old tars did (signed bytes)."""
    header[148:156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in header)
    header[148:156] = b"%06o\0 " % total
    return header


class Trickle:
    """A reader that returns at most 100 bytes per call, like a slow network stream."""

    def __init__(self, raw: bytes):
        self.f = io.BytesIO(raw)

    def read(self, n: int = -1) -> bytes:
        return self.f.read(min(n, 100) if n >= 0 else 100)


MEMBERS = {
    "abc.jpg": bytes(range(256)) * 3,
    "abc.cls": b"2",
    "d" * 120 + "/long-name-past-100-bytes.png": b"\x89PNG" + b"x" * 700,
    "unicodé/ключ.cls": b"1",
    "empty.json": b"",
    "exact.bin": b"z" * 1024,
}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_iter_tar_matches_tarfile(fmt):
    members = dict(MEMBERS)
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold these names
        members = {k: v for k, v in members.items() if k.isascii() and len(k) < 100}
    raw = make_tar(fmt, members)
    expected = tarfile_oracle(raw)
    assert list(iter_tar(io.BytesIO(raw))) == expected
    assert list(iter_tar(Trickle(raw))) == expected
    assert [name for name, _ in expected] == list(members)  # links, dirs, globals skipped


def test_ustar_prefix_field_joins_a_long_path():
    """ustar splits a path over 100 bytes into prefix + name; the reader joins them."""
    name = "p" * 80 + "/" + "q" * 60 + ".jpg"
    raw = make_tar(tarfile.USTAR_FORMAT, {name: b"pixels"}, extras=False)
    assert raw[345:346] == b"p"  # really written through the prefix field
    assert list(iter_tar(io.BytesIO(raw))) == [(name, b"pixels")] == tarfile_oracle(raw)


def test_iter_tar_reads_what_webdataset_tarwriter_wrote_sample_by_sample():
    samples = [{"__key__": f"s{i:03d}", "jpg": bytes([i]) * (300 + 97 * i), "cls": i % 3,
                "json": {"path": f"c/{i}.jpg"}} for i in range(12)]
    buf = io.BytesIO()
    writer = wds.TarWriter(buf)
    for sample in samples:
        writer.write(sample)
    writer.close()
    raw = buf.getvalue()
    members = list(iter_tar(io.BytesIO(raw)))
    assert members == tarfile_oracle(raw)
    # the members of each sample come out together, in the order they were written
    keys = [name.split(".", 1)[0] for name, _ in members]
    assert keys == [s["__key__"] for s in samples for _ in range(3)]
    by_name = dict(members)
    for s in samples:
        assert by_name[f"{s['__key__']}.jpg"] == s["jpg"]
        assert by_name[f"{s['__key__']}.cls"] == str(s["cls"]).encode()
        assert json.loads(by_name[f"{s['__key__']}.json"]) == s["json"]


def test_iter_tar_reads_our_shards_like_tarfile(tmp_path):
    shard_set = make_shards(tmp_path, {"train": 12}, samples_per_shard=5)
    for s in shard_set.meta["splits"]["train"]["shards"]:
        raw = (shard_set.folder / s["name"]).read_bytes()
        members = list(iter_tar(io.BytesIO(raw)))
        assert members == tarfile_oracle(raw)
        assert len(members) == 4 * s["count"]  # image, cls, json, crc32


def test_gnu_base256_size_and_signed_checksum_are_read():
    """Two header encodings `tarfile` accepts: a GNU base-256 number (sizes of 8 GiB and
    more) and a checksum summed over signed bytes (some old tars)."""
    data = b"y" * 700
    raw = bytearray(make_tar(tarfile.GNU_FORMAT, {"é.bin": data}, extras=False))
    header = raw[:BLOCK]
    header[124:136] = b"\x80" + len(data).to_bytes(11, "big")
    raw[:BLOCK] = with_checksum(header)
    assert list(iter_tar(io.BytesIO(bytes(raw)))) == [("é.bin", data)] == tarfile_oracle(raw)
    raw[:BLOCK] = with_checksum(header, signed=True)  # "é" has bytes over 127: sums differ
    assert raw[148:156] != with_checksum(bytearray(header))[148:156]
    assert list(iter_tar(io.BytesIO(bytes(raw)))) == [("é.bin", data)] == tarfile_oracle(raw)


def test_pax_size_overrides_the_header_size():
    data = b"w" * 1500
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size, info.pax_headers = len(data), {"size": str(len(data))}
        tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    start = raw.index(b"big.bin", BLOCK)  # the file's own header, after the pax header
    start -= start % BLOCK
    header = raw[start:start + BLOCK]
    header[124:136] = b"%011o\0" % 0  # what a writer puts there when the size does not fit
    raw[start:start + BLOCK] = with_checksum(header)
    assert list(iter_tar(io.BytesIO(bytes(raw)))) == [("big.bin", data)] == tarfile_oracle(raw)


def test_empty_input_and_a_tar_without_end_blocks_end_quietly():
    assert list(iter_tar(io.BytesIO(b""))) == []
    raw = make_tar(tarfile.USTAR_FORMAT, {"a.cls": b"1", "b.cls": b"2"}, extras=False)
    without_end = raw[:4 * BLOCK]  # two members of one header + one data block each
    assert list(iter_tar(io.BytesIO(without_end))) == [("a.cls", b"1"), ("b.cls", b"2")]


def test_iter_tar_refuses_damage():
    raw = make_tar(tarfile.PAX_FORMAT, MEMBERS, extras=False)
    with pytest.raises(TarFormatError, match="unexpected end of data"):
        list(iter_tar(io.BytesIO(raw[:700])))  # inside the first member's data
    with pytest.raises(TarFormatError, match="unexpected end of data"):
        list(iter_tar(io.BytesIO(raw[:300])))  # inside the first header
    damaged = bytearray(raw)
    damaged[5] ^= 0xFF  # a flipped byte in the first header's name
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(damaged))))
    with pytest.raises(TarFormatError, match="corrupt or not a tar"):
        list(iter_tar(io.BytesIO(b"not a tar at all" * 64)))
    # cut exactly between members: a short, valid tar (the count check catches it)
    first = tarfile_oracle(raw)[:1]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = tar.getmembers()[1].offset
    assert list(iter_tar(io.BytesIO(raw[:cut]))) == first


def test_truncated_or_garbled_pax_header_is_named():
    raw = make_tar(tarfile.PAX_FORMAT, {"ключ.cls": b"1"}, extras=False)
    assert raw[156:157] == b"x"  # a non-ASCII name needs a pax header first
    with pytest.raises(TarFormatError, match="unexpected end of data in an extended header"):
        list(iter_tar(io.BytesIO(raw[:BLOCK + 10])))
    garbled = bytearray(raw)
    at = garbled.index(b" path=", BLOCK)
    garbled[at - 2:at] = b"zz"  # the record's length is no longer a number
    with pytest.raises(TarFormatError, match="bad pax header"):
        list(iter_tar(io.BytesIO(bytes(garbled))))
