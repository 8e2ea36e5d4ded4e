"""shards.format: the record's member names and bytes, shard names, and `meta.json` checks."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest
import webdataset as wds

from shards.format import (
    FORMAT_VERSION,
    INFO_EXT,
    LABEL_EXT,
    META_KEYS,
    META_NAME,
    ShardFormatError,
    decode_label,
    encode_info,
    encode_label,
    read_meta,
    sample_key,
    sample_members,
    shard_name,
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


def test_sample_members_are_image_then_label_then_info_sharing_one_key():
    key = sample_key("dog/1.png")
    info = encode_info("dog/1.png", "dog")
    members = sample_members(key, "png", b"\x89PNG...", 1, info)
    assert members == [(f"{key}.png", b"\x89PNG..."), (f"{key}.{LABEL_EXT}", b"1"),
                       (f"{key}.{INFO_EXT}", info)]


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
         f"format_version {FORMAT_VERSION + 1}, this tench reads {FORMAT_VERSION}"),
        (dict(good_meta(), splits={"train": {"shards": []}}), "split 'train' lacks 'count'"),
        (dict(good_meta(), splits={"valid": {"count": 1}}), "split 'valid' lacks"),
    ],
)
def test_a_bad_meta_is_refused_naming_where_and_what(meta, message):
    with pytest.raises(ShardFormatError, match=message) as err:
        validate_meta(meta, "shards/meta.json")
    assert str(err.value).startswith("shards/meta.json: ")
    assert isinstance(err.value, ValueError)


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
