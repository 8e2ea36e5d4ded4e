"""What a local run listens on: tench itself opens no server; Ray's are listed exactly.

A local `ShardStream` (which starts Ray in-process as `tench fit` does) plays an epoch in a
fresh process; then every listening socket of that process tree is collected. tench opens
no listening socket of its own (shards are read with client connections), and Ray's
dashboard is off. Ray 2.60 itself cannot be held to loopback from `ray.init`:
`_node_ip_address="127.0.0.1"` is rewritten to the machine's reachable IP
(`ray._private.services.resolve_ip_for_localhost`), and its gRPC servers (GCS, raylet,
each worker's core worker, the dashboard/runtime-env agents) listen on that IP or on all
interfaces. So the test pins the exact set of processes allowed a non-loopback listener,
and the README tells users to keep Ray's ports behind a firewall / security group.
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

LOOPBACK = {"127.0.0.1", "::1"}
RAY_SERVER_NAMES = {"gcs_server", "raylet"}  # Ray's C++ servers


def is_ray_process(listener: dict) -> bool:
    """A process Ray started: its servers, its workers/agents (`ray::...`), its Python
    daemons (run from Ray's package folder), or the driver's own Ray core worker."""
    name, cmd = listener["name"], listener["cmd"]
    return (name in RAY_SERVER_NAMES or name.startswith("ray::") or listener["driver"]
            or "site-packages/ray/" in cmd or cmd.startswith("ray::"))


def test_a_local_run_opens_no_listener_of_its_own_and_no_dashboard(tmp_path):
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
    assert listeners, "psutil saw no listening socket at all: the probe is broken"
    assert all(x["port"] != 8265 for x in listeners)  # the dashboard is off
    outside = [x for x in listeners if x["ip"] not in LOOPBACK]
    # Everything reachable from outside is Ray's own (documented above), never tench's.
    assert all(is_ray_process(x) for x in outside), [x for x in outside
                                                      if not is_ray_process(x)]
    # ...and only these kinds of Ray process: the exact set the README warns about.
    kinds = {x["name"] if not x["driver"] else "driver core worker" for x in outside}
    allowed = RAY_SERVER_NAMES | {"driver core worker", "ray::IDLE", "ray::ShardReader",
                                  "ray::DashboardAgent", "ray::RuntimeEnvAgent", "python"}
    assert kinds <= allowed, kinds - allowed
