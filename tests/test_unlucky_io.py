"""Unlucky I/O (issue #12), real each time: an HTTP server that answers 500 or closes the
connection mid-file (on 127.0.0.1, in a thread), `tench inspect` on a URL, and a full
disk while sharding (a 2 MB tmpfs; skipped with the reason where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.actors import ShardReader
from pipeline.plan import Segment
from pipeline.remote import RemoteOptions
from pipeline.source import ShardReadError, ShardSource, read_segment
from shards.inspect import inspect_folder
from tests.shard_fixtures import make_shards, serve_http
from tests.test_actors import in_order, run
from trainer.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
FAST_RETRY = RemoteOptions(retries=1, backoff=0.01)  # each test fault recurs: give up quickly


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, but answers 500 for names in `fail` and sends only half of the
    files in `cut` before closing the connection."""

    fail: frozenset = frozenset()
    cut: frozenset = frozenset()

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        name = self.path.lstrip("/")
        if name in self.fail:
            self.send_error(500, "Internal Server Error")
            return None
        if name in self.cut and self.command == "GET":
            data = Path(self.directory, name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            time.sleep(0.5)  # the client reads what came before it sees the close
            self.close_connection = True
            return None
        return super().send_head()


@contextlib.contextmanager
def serve_faulty(folder: Path, fail=(), cut=()) -> Iterator[str]:
    handler_class = type("Handler", (FaultyHandler,), {"fail": frozenset(fail),
                                                        "cut": frozenset(cut)})
    handler = functools.partial(handler_class, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 30, "valid": 10},
                       samples_per_shard=10, noise=True)


def _train(shard_set, i: int = 0) -> dict:
    return shard_set.meta["splits"]["train"]["shards"][i]


# ------------------------------------------------------------------ 6. remote failures named
def test_a_500_is_reported_as_a_server_error_not_as_not_found(shard_set):
    name = _train(shard_set)["name"]
    with serve_faulty(shard_set.folder, fail={name, "meta.json"}) as url:
        source = ShardSource.of(url, remote=RemoteOptions(retries=1, backoff=0.01))
        with pytest.raises(ShardReadError, match=rf"shard {name}: .* failed 2 times .*the "
                                                 "server answered HTTP 500"):
            list(read_segment(source, Segment(name, 0, 3)))
        with pytest.raises(OSError, match=r"meta\.json: .*the server answered HTTP 500") as err:
            source.read_meta()
        assert not isinstance(err.value, FileNotFoundError)
        with pytest.raises(ShardReadError, match="train-000099.tar: not found under"):
            list(read_segment(source, Segment("train-000099.tar", 0, 1)))  # a real 404


def test_a_connection_closed_mid_shard_names_the_shard(shard_set):
    entry = _train(shard_set, 1)
    with serve_faulty(shard_set.folder, cut={entry["name"]}) as url:
        reader = ShardReader(ShardSource.of(url, remote=FAST_RETRY))
        with pytest.raises(ShardReadError, match=rf"shard {entry['name']}: the download broke "
                                                 r"off after \d+ samples"):
            run(reader, in_order(entry["name"], entry["count"], 5))
        skipping = ShardReader(ShardSource.of(url, remote=FAST_RETRY), on_error="skip")
        batches = run(skipping, in_order(entry["name"], entry["count"], 5))
        skips = [s for b in batches for s in b.skips]
        assert len(skips) == 1 and skips[0].shard == entry["name"]
        assert 0 < skips[0].count < entry["count"]  # what came before the close was used
        assert "download broke off" in skips[0].reason


# ------------------------------------------------------------------ 8. inspect on a URL
def test_inspect_checks_shards_over_http(shard_set, capsys):
    with serve_http(shard_set.folder) as url:
        lines: list[str] = []
        assert inspect_folder(url, write=lines.append) == []
        assert any(_train(shard_set)["name"] in line and line.endswith("ok") for line in lines)
        assert cli_main(["inspect", url + "/"]) == 0
    assert "sizes, sha256, counts and members match" in capsys.readouterr().out


def test_inspect_over_http_names_a_500_and_a_broken_download_in_one_line(shard_set, capsys):
    entry = _train(shard_set, 2)
    with serve_faulty(shard_set.folder, cut={entry["name"]}) as url:
        assert cli_main(["inspect", url]) == 1
    err = capsys.readouterr().err
    assert f"{entry['name']}: read failed (the download broke off" in err
    assert "Traceback" not in err
    with serve_faulty(shard_set.folder, fail={"meta.json"}) as url:
        assert cli_main(["inspect", url]) == 2
    err = capsys.readouterr().err
    assert "meta.json: cannot read (the server answered HTTP 500)" in err
    assert "not found" not in err and "Traceback" not in err


# ------------------------------------------------------------------ 7. a full disk
@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 2 MB tmpfs: a real ENOSPC from the kernel, not a simulated one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "the full-disk case needs one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _noise_tree(src: Path, n: int = 16) -> None:
    """About 200 KB per image (noise does not compress): 3 MB in all, over the 2 MB disk."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 2)):
        (src / split / "cat").mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / split / "cat" / f"{i}.png", compress_level=1)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_full_disk_is_one_sentence_and_leaves_nothing_that_looks_complete(
        tmp_path, small_disk, processes):
    _noise_tree(tmp_path / "src")
    out = small_disk / "out"
    command = [sys.executable, "-m", "trainer.cli", "shard", str(tmp_path / "src"), str(out),
               "--processes", str(processes), "--shard-size", "1000000"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()  # one sentence
    assert line.startswith("tench shard: ") and str(out) in line
    assert "No space left on device" in line and "bytes of" in line
    assert "nothing in OUT looks complete" in line
    assert os.listdir(small_disk) == []  # no shard, no meta.json, no .partial; OUT removed
    debug = subprocess.run(command + ["--force", "--debug"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert os.listdir(small_disk) == []
