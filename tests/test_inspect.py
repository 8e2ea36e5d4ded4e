"""`tench inspect`: a real shards folder summarised, and each way it can disagree with meta.json."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from shards.inspect import inspect_folder
from shards.sharder import shard_folder
from tests.test_sharder import make_tree
from trainer.cli import main as cli_main


@pytest.fixture
def out(tmp_path) -> Path:
    src = tmp_path / "src"
    make_tree(src, train=6, valid=2)
    (src / "train/cat/broken.jpg").write_bytes(b"")
    (src / "train/cat/notes.txt").write_text("x")
    shard_folder(src, tmp_path / "out", max_count=4, progress=False)
    return tmp_path / "out"


def _meta(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())


def _inspect(out: Path) -> tuple[list[str], list[str]]:
    lines: list[str] = []
    problems = inspect_folder(out, write=lines.append)
    return lines, problems


def test_summary_shows_vocab_splits_shards_stats_and_skipped(out, capsys):
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    meta = _meta(out)
    assert "vocab: 3 labels" in text and "cat, dog, fish" in text
    assert f"train: 18 images in {len(meta['splits']['train']['shards'])} shards" in text
    assert "valid: 6 images in 2 shards" in text
    assert "train-000000.tar" in text and "ok" in text
    assert f"mean [{meta['stats']['mean'][0]:.4f}" in text
    assert "skipped 2 files: " in text
    assert "1 empty file" in text and "1 no image extension" in text
    assert "train/cat/broken.jpg: empty file" in text
    assert "sizes, sha256, counts and members match" in text


def test_a_changed_byte_is_a_sha256_mismatch_and_names_the_damaged_sample(out, capsys):
    path = out / "train-000001.tar"
    with tarfile.open(path) as tar:
        first = tar.getmembers()[0]  # the first sample's image
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first image: the tar still reads
    path.write_bytes(bytes(data))
    lines, problems = _inspect(out)
    stored = _meta(out)["splits"]["train"]["shards"][1]["sha256"]
    key, ext = first.name.split(".")
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}: sample {key} .{ext} member is damaged (crc32 ")
    assert problems[1].startswith(f"{path}: sha256 ")
    assert problems[1].endswith(f"meta.json says {stored[:16]}…")
    assert any("train-000001.tar" in line and "MISMATCH" in line for line in lines)
    assert cli_main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar: sha256" in err and "does not match its meta.json" in err


def test_a_cut_shard_is_named_by_size_and_as_incomplete(out):
    path = out / "valid-000000.tar"
    path.write_bytes(path.read_bytes()[:1500])
    _, problems = _inspect(out)
    assert any("not a complete tar file" in p for p in problems)
    assert any(f"{path}: 1,500 bytes, meta.json says" in p for p in problems)


def test_a_missing_shard_and_a_wrong_count_are_named(out):
    meta = _meta(out)
    (out / "train-000002.tar").unlink()
    meta["splits"]["valid"]["shards"][0]["count"] += 1
    (out / "meta.json").write_text(json.dumps(meta))
    _, problems = _inspect(out)
    assert f"{out / 'train-000002.tar'}: missing (meta.json lists it)" in problems
    assert any("valid-000000.tar: 4 samples, meta.json says 5" in p for p in problems)
    assert any("valid count 6 is not the sum of its shard counts" in p for p in problems)


def test_a_sample_without_a_label_or_with_a_bad_label_is_named(out):
    meta = _meta(out)
    entry = meta["splits"]["valid"]["shards"][1]
    path = out / entry["name"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name.endswith(".cls"):
                data = b"7"  # only 3 labels
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    _, problems = _inspect(out)
    assert any("has label '7', not an index below 3" in p for p in problems)


def test_leftover_temp_files_and_unlisted_shards_are_noted(out):
    (out / ".train-000009.tar.123.partial").write_bytes(b"x")
    (out / "train-000042.tar").write_bytes(b"x")
    lines, problems = _inspect(out)
    assert problems == []
    assert any(".train-000009.tar.123.partial is a temporary file" in line for line in lines)
    assert any("train-000042.tar is not listed in meta.json" in line for line in lines)


def test_no_meta_json_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path)]) == 2
    assert "meta.json: not found; is" in capsys.readouterr().err


def test_no_verify_reads_only_meta(out):
    (out / "train-000000.tar").write_bytes(b"changed")
    lines: list[str] = []
    assert inspect_folder(out, verify=False, write=lines.append) == []
    assert not any("MISMATCH" in line for line in lines)


def test_a_closed_pipe_stops_quietly(out):
    """`tench inspect OUT | head -1`: the reader leaves early; no traceback, exit 141."""
    import os
    import subprocess
    import sys

    # stdout block-buffered, as for any user's pipe (PYTHONUNBUFFERED would hide the exit flush)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "inspect", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err
