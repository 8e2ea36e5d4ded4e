import hashlib
import io
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from shards.format import decode_label, encode_info
from shards.writer import ShardWriter


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20 + seed, 16), (seed * 7 % 256, 30, 90)).save(buf, "JPEG")
    return buf.getvalue()


def test_rolls_shards_and_reads_back_with_webdataset_and_tarfile(tmp_path):
    images = {f"k{i:03d}": _jpeg(i) for i in range(25)}
    with ShardWriter(tmp_path, "train", max_bytes=8_000) as w:
        for i, (key, data) in enumerate(images.items()):
            w.write(key, "jpg", data, i % 3, encode_info(f"c/{key}.jpg", "c"))
    shards = w.shards
    assert len(shards) > 1
    assert sum(s.count for s in shards) == 25
    for s in shards:
        raw = (tmp_path / s.name).read_bytes()
        assert len(raw) == s.bytes
        assert hashlib.sha256(raw).hexdigest() == s.sha256
    # nothing temporary is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s.name for s in shards)

    seen = {}
    for s in shards:
        for sample in wds.WebDataset(str(tmp_path / s.name), shardshuffle=False):
            seen[sample["__key__"]] = (sample["jpg"], decode_label(sample["cls"]))
    assert {k: v[0] for k, v in seen.items()} == images
    assert [seen[k][1] for k in images] == [i % 3 for i in range(25)]

    names = []
    for s in shards:
        with tarfile.open(tmp_path / s.name) as tar:
            names += tar.getnames()
    assert len(names) == 100 and len(set(names)) == 100  # image, cls, json, crc32 each


def test_abort_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "valid", max_bytes=1 << 20) as w:
        w.write("a", "jpg", _jpeg(1), 0, b"{}")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_oversized_sample_gets_its_own_shard(tmp_path):
    big = _jpeg(1) * 10
    with ShardWriter(tmp_path, "train", max_bytes=1_000) as w:
        w.write("a", "jpg", big, 0, b"{}")
        w.write("b", "jpg", big, 0, b"{}")
    assert [s.count for s in w.shards] == [1, 1]
