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

import time
import numpy as np
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

def store_bytes():
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state, timeout_seconds=10).store_stats.object_store_bytes_used

empty, freed_s = store_bytes(), []
for _ in range(3):  # the second and third start just after a batched free, if Ray batches
    ref = ray.put(np.ones(4 << 20, np.uint8))
    assert store_bytes() > empty, "the object never reached the object store"
    del ref
    t = time.monotonic()
    while store_bytes() > empty and time.monotonic() - t < 5:
        time.sleep(0.005)
    freed_s.append(time.monotonic() - t)

print("RESULT " + json.dumps({"started": started, "cpus": ray.cluster_resources()["CPU"],
                              "modules": ray.get(modules.remote()),
                              "actor_threads": ray.get(reader.torch_threads.remote()),
                              "freed_s": freed_s}))
ray.shutdown()
"""


def test_ensure_ray_starts_workers_with_the_stream_modules_imported_one_thread_and_free_at_once():
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
    # a released object leaves the store at once, not at Ray's next batched free (every
    # second by default, which the later rounds would each wait for in full)
    assert max(result["freed_s"][1:]) < 0.5, f"seconds to free: {result['freed_s']}"
