"""The Ray that tench starts for itself: workers come up with the stream's imports done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, ray
from pipeline.stream import ensure_ray

started = ensure_ray()

@ray.remote
def modules():
    return sorted(m for m in ("torch", "torchvision", "pipeline.actors") if m in sys.modules)

from pipeline.actors import ShardReader
from pipeline.source import ShardSource

reader = ray.remote(ShardReader).remote(ShardSource.of("/nowhere"))  # only its threads

print("RESULT " + json.dumps({"started": started, "cpus": ray.cluster_resources()["CPU"],
                              "modules": ray.get(modules.remote()),
                              "actor_threads": ray.get(reader.torch_threads.remote())}))
ray.shutdown()
"""


def test_ensure_ray_starts_workers_with_the_stream_modules_imported_and_one_thread():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["started"] is True
    assert result["cpus"] == len(os.sched_getaffinity(0))
    # a plain task never imports these itself: the worker had them before it took work
    assert result["modules"] == ["pipeline.actors", "torch", "torchvision"]
    # torch was imported before Ray set OMP_NUM_THREADS=1: the actor still uses one thread
    assert result["actor_threads"] == 1
