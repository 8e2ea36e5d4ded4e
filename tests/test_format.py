"""shards.format: the record's member names and bytes, shard names, and `meta.json` checks."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib

import pytest
import webdataset as wds

from shards.format import (
    CHECKSUM_EXT,
    CHECKSUM_SIZE,
    FORMAT_VERSION,
    INFO_EXT,
    LABEL_EXT,
    META_KEYS,
    META_NAME,
    ShardFormatError,
    decode_label,
    encode_info,
    encode_label,
    json_bytes,
    read_meta,
    sample_key,
    sample_members,
    sample_problem,
    shard_name,
    shown,
    validate_meta,
)


def good_meta() -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "vocab": ["cat", "dog"],
        "vocab_fingerprint": "f" * 64,
        "splits": {"train": {"count": 3, "shards": []}, "valid": {"count": 0, "shards": []}},
        "stats": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "skipped": [],
    }


# ----------------------------------------------------------------------------- the record
def test_shard_name_is_split_then_six_digits():
    assert shard_name("train", 0) == "train-000000.tar"
    assert shard_name("valid", 123) == "valid-000123.tar"
    names = [shard_name("train", i) for i in (2, 10, 100)]
    assert names == sorted(names)  # zero padding: listing order is shard order


def test_sample_key_is_stable_unique_and_safe_for_webdataset():
    paths = ["cat/1.jpg", "cat/1.jpeg", "dog/1.jpg", "a.b/c.d.png", "ключ/ü.png", "x" * 500]
    keys = [sample_key(p) for p in paths]
    assert len(set(keys)) == len(paths)
    assert all(re.fullmatch(r"[0-9a-f]{20}", k) for k in keys)  # no dot, no slash
    # the same path gives the same key on every run and every tench version (keys are stored)
    assert sample_key("cat/1.jpg") == keys[0] == "deb377fa117e8f712e17"


def test_labels_are_ascii_decimal_and_round_trip():
    for index in (0, 7, 1234):
        assert encode_label(index) == str(index).encode("ascii")
        assert decode_label(encode_label(index)) == index
    assert decode_label(b" 3\n") == 3  # a hand-made `cls` member with whitespace
    with pytest.raises(ValueError):
        decode_label(b"cat")


def test_info_is_utf8_json_with_path_and_label():
    data = encode_info("zèbre/ü 1.jpg", "zèbre")
    assert json.loads(data.decode("utf-8")) == {"path": "zèbre/ü 1.jpg", "label": "zèbre"}
    assert "zèbre".encode() in data  # readable, not \\u-escaped


def test_sample_members_are_image_label_info_then_their_crc32s_sharing_one_key():
    key = sample_key("dog/1.png")
    info = encode_info("dog/1.png", "dog")
    image = b"\x89PNG..."
    members = sample_members(key, "png", image, 1, info)
    sums = {"png": f"{zlib.crc32(image):08x}", LABEL_EXT: f"{zlib.crc32(b'1'):08x}",
            INFO_EXT: f"{zlib.crc32(info):08x}"}
    assert members == [(f"{key}.png", b"\x89PNG..."), (f"{key}.{LABEL_EXT}", b"1"),
                       (f"{key}.{INFO_EXT}", info),
                       (f"{key}.{CHECKSUM_EXT}", json.dumps(sums).encode())]
    assert len(members[-1][1]) <= CHECKSUM_SIZE  # what the planner reserves for it


def _members(image: bytes = b"\xff\xd8 jpeg bytes") -> dict:
    return {name.split(".", 1)[1]: data for name, data in
            sample_members("k", "jpg", image, 2, encode_info("cat/1.jpg", "cat"))}


def test_a_sample_whose_members_match_their_crc32s_passes():
    assert sample_problem(_members()) is None
    old = _members()
    del old[CHECKSUM_EXT]  # a format 1 sample: nothing to verify, still readable
    assert sample_problem(old) is None


@pytest.mark.parametrize("ext", ["jpg", LABEL_EXT, INFO_EXT])
def test_one_flipped_byte_in_any_member_is_named(ext):
    members = _members()
    data = bytearray(members[ext])
    data[len(data) // 2] ^= 0x10
    members[ext] = bytes(data)
    assert re.match(rf"\.{ext} member is damaged \(crc32 [0-9a-f]{{8}}, stored [0-9a-f]{{8}}\)",
                    sample_problem(members))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(pickle=b"cos\nsystem\n"), r"members \['pickle'\] that are not part"),
    (lambda m: m.update(pyd=b"MZ"), r"members \['pyd'\] that are not part"),
    (lambda m: m.update(png=b"x"), r"image members \['jpg', 'png'\], expected one"),
    (lambda m: m.pop(LABEL_EXT), r"has no \.cls member"),
    (lambda m: m.pop(INFO_EXT), r"has no \.json member"),
    (lambda m: m.update(crc32=b"{not json"), r"damaged \.crc32 member"),
])
def test_a_malformed_sample_is_named(change, message):
    members = _members()
    change(members)
    assert re.search(message, sample_problem(members))


def test_a_file_name_that_is_not_utf8_is_stored_losslessly():
    rel = os.fsdecode(b"cat/caf\xe9 \xff.jpg")  # Latin-1 bytes: not valid UTF-8
    assert sample_key(rel) == sample_key(rel) != sample_key("cat/caf .jpg")
    info = encode_info(rel, "cat")
    back = json.loads(info)["path"]
    assert os.fsencode(back) == b"cat/caf\xe9 \xff.jpg"  # the same bytes come back
    assert info.decode("ascii")  # valid JSON text, the odd bytes as \udcXX escapes
    assert json_bytes({"a": "zèbre"}) == '{"a": "zèbre"}'.encode()  # UTF-8 names stay readable
    assert shown(rel) == "cat/caf\\xe9 \\xff.jpg"


def test_webdataset_reads_a_record_back_as_one_sample(tmp_path):
    """The oracle for the format: webdataset groups our members into one sample by key."""
    path = tmp_path / shard_name("train", 0)
    with tarfile.open(path, mode="w") as tar:
        for i, label in enumerate(["cat", "dog"]):
            rel = f"{label}/{i}.jpg"
            for name, data in sample_members(sample_key(rel), "jpg", b"jpeg bytes", i,
                                             encode_info(rel, label)):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key("cat/0.jpg"), sample_key("dog/1.jpg")]
    assert [decode_label(s[LABEL_EXT]) for s in samples] == [0, 1]
    assert [json.loads(s[INFO_EXT])["label"] for s in samples] == ["cat", "dog"]
    assert all(s["jpg"] == b"jpeg bytes" for s in samples)


# ----------------------------------------------------------------------------- meta.json
def test_a_good_meta_passes_and_comes_back_unchanged():
    meta = good_meta()
    assert validate_meta(meta) is meta
    assert set(META_KEYS) == set(meta)


@pytest.mark.parametrize(
    "meta, message",
    [
        ([1, 2], "expected a JSON object, got list"),
        ({k: v for k, v in good_meta().items() if k != "stats"}, r"missing keys \['stats'\]"),
        (dict(good_meta(), format_version=FORMAT_VERSION + 1),
         f"format_version {FORMAT_VERSION + 1}, this tench reads 1, 2"),
        (dict(good_meta(), splits={"train": {"shards": []}}), "split 'train' lacks 'count'"),
        (dict(good_meta(), splits={"valid": {"count": 1}}), "split 'valid' lacks"),
    ],
)
def test_a_bad_meta_is_refused_naming_where_and_what(meta, message):
    with pytest.raises(ShardFormatError, match=message) as err:
        validate_meta(meta, "shards/meta.json")
    assert str(err.value).startswith("shards/meta.json: ")
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", [
    "/etc/passwd", "../../../../etc/passwd", "sub/train-000000.tar", "..", ".hidden.tar",
    "train-000000.tar?x=1", "http://evil/x.tar", "", 7, None,
])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused(name):
    meta = good_meta()
    meta["splits"]["train"]["shards"] = [
        {"name": "train-000000.tar", "count": 1, "bytes": 10240, "sha256": "0" * 64},
        {"name": name, "count": 2, "bytes": 10240, "sha256": "0" * 64}]
    with pytest.raises(ShardFormatError, match=r"split 'train' shard 1: shard name .* is not "
                                               r"a plain file name.*refusing to open it"):
        validate_meta(meta)


def test_format_1_meta_is_still_read():
    assert validate_meta(dict(good_meta(), format_version=1))["format_version"] == 1


def test_read_meta_from_a_folder(tmp_path):
    (tmp_path / META_NAME).write_text(json.dumps(good_meta()), encoding="utf-8")
    assert read_meta(tmp_path) == good_meta() == read_meta(str(tmp_path))


def test_read_meta_says_what_to_do_when_it_cannot(tmp_path):
    with pytest.raises(ShardFormatError, match=r"meta\.json: not found; is .* made by `tench "
                                               r"shard`\?"):
        read_meta(tmp_path)
    (tmp_path / META_NAME).write_text("{not json")
    with pytest.raises(ShardFormatError, match=r"meta\.json: not valid JSON"):
        read_meta(tmp_path)
    (tmp_path / META_NAME).write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ShardFormatError, match=r"missing keys .*re-run `tench shard`"):
        read_meta(tmp_path)
