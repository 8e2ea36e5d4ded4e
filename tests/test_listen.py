"""What a local run listens on: Ray's servers on 127.0.0.1 only, tench none of its own.

A local `ShardStream` (which starts Ray in-process as `tench fit` does) plays an epoch in a
fresh process; then every listening socket of that process tree is collected: the driver's
core worker, the GCS, the raylet (node manager and object manager), every worker and actor,
the dashboard agent (gRPC, HTTP and metrics export) and the runtime-env agent. All must be
on loopback: tench starts Ray in its single-machine mode (`pipeline/ray_setup.py`), whose
node address is 127.0.0.1, and no dashboard or Ray Client server is started at all. There
is no exception to list; a Ray upgrade that binds anything wider fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.shard_fixtures import make_shards

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, psutil
from pipeline.stream import ShardStream
with ShardStream(sys.argv[1], "train", batch_size=8, size=16, num_actors=2) as stream:
    n = sum(len(b.keys) for b in stream)
    me = psutil.Process()
    tree = {me.pid: me} | {p.pid: p for p in me.children(recursive=True)}
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in tree:
            p = tree[c.pid]
            try:
                name, cmd = p.name(), " ".join(p.cmdline())
            except psutil.Error:
                name, cmd = "?", ""
            found.append({"pid": c.pid, "ip": c.laddr.ip, "port": c.laddr.port,
                          "name": name, "cmd": cmd, "driver": c.pid == me.pid})
print("RESULT " + json.dumps({"samples": n, "listeners": found}))
"""

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # the last: IPv4 loopback on a v6 socket


def test_a_local_run_listens_on_loopback_only(tmp_path):
    shards = make_shards(tmp_path / "shards", {"train": 20, "valid": 4})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(shards.folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines()
                             if x.startswith("RESULT "))[len("RESULT "):])
    assert result["samples"] == 20
    listeners = result["listeners"]
    names = {x["name"] for x in listeners}
    # the probe sees the whole tree: Ray's C++ servers, the driver and the stream's actors
    assert {"gcs_server", "raylet", "ray::ShardReader", "ray::DashboardAgent",
            "ray::RuntimeEnvAgent"} <= names, names
    assert any(x["driver"] for x in listeners)
    outside = [x for x in listeners if x["ip"] not in LOOPBACK]
    assert outside == [], outside
