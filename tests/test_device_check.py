"""bench/device_check.sh, the prepared GPU check, runs on a machine without one (issue #13):
every CUDA part says it is skipped, the stream and `tench fit` parts run on tiny inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_the_quick_device_check_runs_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_WORK": str(tmp_path)}
    done = subprocess.run(["bash", "bench/device_check.sh", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-2000:] + done.stderr[-2000:]
    assert out.count("skipped: no CUDA GPU here") == 2  # (a) the model alone, (d) the optimizer
    assert "skipped: needs a CUDA GPU" not in out  # --quick runs (c) on the CPU
    assert "| shardstream |" in out  # (b) printed its table row
    assert "epoch 0:" in out and "images/s, data_wait" in out  # (c) read metrics.json
    assert out.rstrip().endswith("== device check done")
