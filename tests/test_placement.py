"""Where a stream's actors run on a multi-node cluster, for each `placement`.

A real `ray.cluster_utils.Cluster` (a head and two worker nodes on this machine) in a fresh
process, so the pytest process's own Ray is left alone. "local" must keep every actor on
the driver's node (batches never cross the network); "spread" must deal them over all nodes.
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
import json, sys, ray
from ray.cluster_utils import Cluster
from pipeline.stream import ShardStream

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
for _ in range(2):
    cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
result = {"driver": ray.get_runtime_context().get_node_id(),
          "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}
try:
    for placement in ("local", "spread"):
        with ShardStream(sys.argv[1], "train", batch_size=4, size=16, num_actors=3,
                         placement=placement) as stream:
            keys = [k for batch in stream for k in batch.keys]
            result[placement] = {"actor_nodes": stream.actor_nodes(), "keys": keys}
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(result))
"""


def test_local_keeps_actors_on_the_drivers_node_and_spread_deals_them_over_all(tmp_path):
    shards = make_shards(tmp_path / "shards", {"train": 24, "valid": 4})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(shards.folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines()
                             if x.startswith("RESULT "))[len("RESULT "):])
    assert len(result["nodes"]) == 3 and result["driver"] in result["nodes"]
    local, spread = result["local"], result["spread"]
    assert local["actor_nodes"] == [result["driver"]] * 3
    # round-robin from the driver's node: one actor on each node
    assert spread["actor_nodes"][0] == result["driver"]
    assert sorted(spread["actor_nodes"]) == result["nodes"]
    expected = sorted(shards.labels["train"])
    assert sorted(local["keys"]) == expected and sorted(spread["keys"]) == expected
