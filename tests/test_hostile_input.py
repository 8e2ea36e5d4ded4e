"""Hostile and unlucky input (issue #12), each case a real file: a `meta.json` naming files
outside its folder, a flipped byte in a stored JPEG, a file name that is not UTF-8, and
old (format 1) shards that must still read. The network and full-disk cases are in
test_unlucky_io.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.actors import ShardReader
from pipeline.plan import Segment
from pipeline.source import ShardReadError, ShardSource, read_segment
from shards.format import ShardFormatError, read_meta
from shards.inspect import inspect_folder
from shards.sharder import shard_folder
from tests.shard_fixtures import encode, make_shards
from tests.test_actors import in_order, run
from trainer.cli import main as cli_main

SECRET = b"TOPSECRET-PASSWORD-42\n"


def _edit_meta(folder: Path, **names: str) -> None:
    """Point train shard i at `names[f"s{i}"]` in `meta.json`, as a hostile edit would."""
    meta = json.loads((folder / "meta.json").read_text())
    for key, name in names.items():
        meta["splits"]["train"]["shards"][int(key[1:])]["name"] = name
    (folder / "meta.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------ 1. names that leave the folder
@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../etc/passwd"])
def test_a_shard_name_outside_the_folder_is_refused_before_anything_opens_it(
        tmp_path, capsys, name):
    shard_set = make_shards(tmp_path / "shards", {"train": 20, "valid": 5})
    _edit_meta(shard_set.folder, s1=name)
    with pytest.raises(ShardFormatError, match=r"split 'train' shard 1: shard name '.*passwd' "
                                               "is not a plain file name"):
        inspect_folder(shard_set.folder, write=lambda line: None)
    with pytest.raises(ShardFormatError, match="not a plain file name"):
        ShardSource.of(shard_set.folder).read_meta()  # what ShardStream and `tench fit` read
    assert cli_main(["inspect", str(shard_set.folder)]) == 2
    err = capsys.readouterr().err
    assert "not a plain file name" in err and "root:" not in err  # nothing of the file quoted


def test_a_real_tar_elsewhere_with_its_own_sha256_is_not_accepted(tmp_path):
    """meta.json holds the sizes and sha256s too, so an edit can make any tar 'match'."""
    shard_set = make_shards(tmp_path / "shards", {"train": 20, "valid": 5})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    entry = shard_set.meta["splits"]["train"]["shards"][0]
    shutil.move(shard_set.folder / entry["name"], elsewhere / "evil.tar")
    _edit_meta(shard_set.folder, s0="../elsewhere/evil.tar")
    with pytest.raises(ShardFormatError, match="'../elsewhere/evil.tar' is not a plain file"):
        inspect_folder(shard_set.folder, write=lambda line: None)
    # and the reader itself refuses such a name, whoever built the plan
    reader = ShardReader(ShardSource.of(shard_set.folder), on_error="skip")
    with pytest.raises(ShardFormatError, match="not a plain file name"):
        run(reader, in_order("../elsewhere/evil.tar", entry["count"], 4))
    with pytest.raises(ShardFormatError):
        ShardSource.of(shard_set.folder).open("/etc/passwd")


# ------------------------------------------------------------------ 2. a damaged sample
def _flip_inside_a_jpeg(folder: Path, name: str) -> tuple[str, int]:
    """Flip bytes in the middle of the first JPEG member of `name` whose damaged bytes still
    decode (the silent case); return its sample key and its index in the shard."""
    path = folder / name
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    for member in members:
        for offset in range(member.size // 2, member.size - 8, 7):
            damaged = bytearray(raw[member.offset_data:member.offset_data + member.size])
            damaged[offset:offset + 4] = bytes(b ^ 0x5A for b in damaged[offset:offset + 4])
            try:
                Image.open(io.BytesIO(bytes(damaged))).load()
            except Exception:  # noqa: BLE001 - this flip breaks the JPEG; try another
                continue
            raw[member.offset_data:member.offset_data + member.size] = damaged
            path.write_bytes(bytes(raw))
            key = member.name.split(".")[0]
            return key, keys.index(key)
    raise AssertionError("no flip that still decodes")


@pytest.fixture
def damaged(tmp_path):
    shard_set = make_shards(tmp_path, {"train": 12}, samples_per_shard=12, image_size=(64, 48),
                            noise=True)
    name = shard_set.meta["splits"]["train"]["shards"][0]["name"]
    count = shard_set.meta["splits"]["train"]["shards"][0]["count"]
    key, index = _flip_inside_a_jpeg(tmp_path, name)
    return shard_set, name, count, key, index


def test_a_damaged_jpeg_that_still_decodes_fails_the_epoch_naming_shard_and_sample(damaged):
    shard_set, name, count, key, _ = damaged
    reader = ShardReader(ShardSource.of(shard_set.folder))
    with pytest.raises(ShardReadError, match=rf"shard {name}: sample {key} \.jpg member is "
                                             r"damaged \(crc32 [0-9a-f]{8}, stored"):
        run(reader, in_order(name, count, 4))


def test_a_damaged_jpeg_is_skipped_and_reported_in_skip_mode(damaged):
    shard_set, name, count, key, _ = damaged
    reader = ShardReader(ShardSource.of(shard_set.folder), on_error="skip")
    batches = run(reader, in_order(name, count, 4))
    skips = [s for b in batches for s in b.skips]
    assert [(s.shard, s.where, s.count) for s in skips] == [(name, f"sample {key}", 1)]
    assert "damaged" in skips[0].reason
    delivered = {k for b in batches for k in b.keys}
    assert key not in delivered and len(delivered) == count - 1


def test_inspect_and_the_stream_agree_on_the_damaged_sample(damaged, capsys):
    shard_set, name, _, key, index = damaged
    lines: list[str] = []
    problems = inspect_folder(shard_set.folder, write=lines.append)
    assert any(f"sample {key} .jpg member is damaged" in p for p in problems)
    # the same verdict from the stream's reader, before any decoding
    (sample,) = read_segment(ShardSource.of(shard_set.folder), Segment(name, index, index + 1))
    assert sample.key == key and ".jpg member is damaged" in sample.problem
    assert sample.data == b"" and sample.label == -1


def test_an_extra_pickle_member_is_refused_by_inspect_and_the_stream_alike(tmp_path):
    shard_set = make_shards(tmp_path, {"train": 6}, samples_per_shard=6)
    name = shard_set.meta["splits"]["train"]["shards"][0]["name"]
    path = tmp_path / name
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_key = members[0][0].name.split(".")[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
            if member.name == f"{first_key}.json":
                extra = tarfile.TarInfo(f"{first_key}.pickle")
                extra.size = 9
                tar.addfile(extra, io.BytesIO(b"cos\nsys\n."))
    path.write_bytes(buf.getvalue())
    problems = inspect_folder(tmp_path, write=lambda line: None)
    assert any(f"sample {first_key} has members ['pickle']" in p for p in problems)
    reader = ShardReader(ShardSource.of(tmp_path))
    with pytest.raises(ShardReadError, match=rf"sample {first_key} has members \['pickle'\]"):
        run(reader, in_order(name, 6, 3))


# ------------------------------------------------------------------ format 1 still reads
def test_format_1_shards_without_checksums_still_stream_and_inspect(tmp_path):
    shard_set = make_shards(tmp_path, {"train": 8}, samples_per_shard=8)
    name = shard_set.meta["splits"]["train"]["shards"][0]["name"]
    path = tmp_path / name
    with tarfile.open(path) as tar:  # rewrite as tench 1 wrote it: no crc32 members
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()
                   if not m.name.endswith(".crc32")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["format_version"] = 1
    meta["splits"]["train"]["shards"][0].update(
        bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert inspect_folder(tmp_path, write=lambda line: None) == []
    batches = run(ShardReader(ShardSource.of(tmp_path)), in_order(name, 8, 4))
    assert sorted(k for b in batches for k in b.keys) == sorted(shard_set.labels["train"])


# ------------------------------------------------------------------ 3. names that are not UTF-8
def test_a_file_name_that_is_not_utf8_is_kept_with_its_exact_bytes(tmp_path, capsys):
    src = os.fsencode(tmp_path / "src")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        os.makedirs(os.path.join(src, split.encode(), b"cat"))
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                os.fsdecode(os.path.join(src, split.encode(), b"cat", b"%d.jpg" % i)))
    odd = os.path.join(src, b"train", b"cat", b"caf\xe9 \xff.jpg")  # Latin-1: not UTF-8
    with open(odd, "wb") as f:
        f.write(encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "JPEG"))
    with open(os.path.join(src, b"train", b"cat", b"notes\xfe.txt"), "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    assert cli_main(["shard", os.fsdecode(src), str(out), "--processes", "1"]) == 0
    meta = read_meta(out)
    assert meta["splits"]["train"]["count"] == 4  # the odd name is kept, not dropped
    assert [os.fsencode(s["path"]) for s in meta["skipped"]] == [b"train/cat/notes\xfe.txt"]
    stored = []
    for entry in meta["splits"]["train"]["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            stored += [json.loads(tar.extractfile(m).read())["path"]
                       for m in tar.getmembers() if m.name.endswith(".json")]
    assert b"train/cat/caf\xe9 \xff.jpg" in [os.fsencode(p) for p in stored]  # lossless
    capsys.readouterr()
    assert cli_main(["inspect", str(out), "--all"]) == 0
    assert "notes\\xfe.txt" in capsys.readouterr().out  # shown escaped, not a crash


# ------------------------------------------------------------------ 8. no content in reasons
def test_a_skipped_symlink_to_a_secret_records_the_kind_of_problem_not_its_bytes(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val"):
        (src / split / "cat").mkdir(parents=True)
        Image.new("RGB", (16, 16), (9, 9, 9)).save(src / split / "cat" / "ok.jpg")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    (src / "train" / "cat" / "leak.jpg").symlink_to(secret)
    meta = shard_folder(src, tmp_path / "out", processes=1, progress=False)
    (entry,) = [s for s in meta["skipped"] if s["path"] == "train/cat/leak.jpg"]
    assert entry["reason"].startswith("not an image: ")
    text = (tmp_path / "out" / "meta.json").read_text()
    assert "TOPSEC" not in text and "TOPSEC" not in entry["reason"]


def test_fit_on_a_damaged_shard_says_one_sentence_and_no_traceback(tmp_path):
    """Issue #12 item 7: `tench fit` meeting a damaged sample mid-run prints one line naming
    the shard and the sample, exits 1, and --debug adds the traceback."""
    import subprocess
    import sys

    shard_set = make_shards(tmp_path / "shards", {"train": 24, "valid": 8}, samples_per_shard=24,
                            image_size=(40, 36), noise=True)
    name = shard_set.meta["splits"]["train"]["shards"][0]["name"]
    key, _ = _flip_inside_a_jpeg(shard_set.folder, name)
    command = [sys.executable, "-m", "trainer.cli", "fit", str(shard_set.folder), "--out",
               str(tmp_path / "run"), "--epochs", "1", "--size", "16", "--arch", "cnn",
               "--batch-size", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("tench fit:")]
    assert len(lines) == 1 and name in lines[0] and key in lines[0] and "damaged" in lines[0]
    assert "Traceback" not in done.stderr
    debug = subprocess.run([*command, "--force", "--debug"], capture_output=True, text=True,
                           timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert debug.returncode == 1 and "Traceback" in debug.stderr
