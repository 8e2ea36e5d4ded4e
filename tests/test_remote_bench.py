"""bench/remote_bench.py (issue #16): its throttled server paces, answers Range and counts; its
quick run plays every row for two epochs, and a cached second epoch fetches no shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from throttled_http import serve_throttled  # noqa: E402


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
        return r.status, r.read()


def test_the_server_waits_caps_the_rate_answers_range_and_counts(tmp_path):
    data = os.urandom(600_000)
    (tmp_path / "train-0.tar").write_bytes(data)
    (tmp_path / "meta.json").write_text("{}")
    with serve_throttled(tmp_path, latency=0.05, rate=2e6) as server:
        t = time.perf_counter()
        assert get(f"{server.url}/train-0.tar") == (200, data)
        assert time.perf_counter() - t >= 0.05 + 0.25  # 600 KB at 2 MB/s, after the wait
        assert get(f"{server.url}/train-0.tar", {"Range": "bytes=500000-"}) == (206, data[500_000:])
        assert get(f"{server.url}/meta.json") == (200, b"{}")
        status, body = get(f"{server.url}/_stats")
        assert status == 200
        assert json.loads(body) == {"requests": 3, "tar_requests": 2,
                                    "tar_bytes": len(data) + 100_000, "other_bytes": 2}


def test_the_quick_run_plays_every_row_and_a_cached_epoch_2_fetches_no_shard(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "bench/remote_bench.py", "--quick", "--work",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    rows = {(cells[1].strip(), cells[2].strip())
            for cells in (line.split("|") for line in table[1:])}
    assert rows == {(row, epoch) for row in ("tench-disk", "tench-http", "tench-cache",
                                             "wds-http", "wds-cache") for epoch in ("1", "2")}
    results = json.loads((tmp_path / "remote_bench.json").read_text())
    assert all(e["images"] == 200 for epochs in results.values() for e in epochs)
    for row in ("tench-cache", "wds-cache"):
        first, second = results[row]
        assert first["tar_bytes"] > 0 and first["tar_requests"] >= 4  # 4 shards, fetched
        assert second["tar_bytes"] == 0 and second["tar_requests"] == 0  # read from the cache
    for row in ("tench-http", "wds-http"):
        assert all(e["tar_bytes"] > 0 for e in results[row])  # no cache: fetched every epoch
    assert all(e["requests"] == 0 for e in results["tench-disk"])
