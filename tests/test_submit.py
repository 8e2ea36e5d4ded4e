"""`trainer/submit.py` run exactly as `ray submit` runs it on the head node of a cluster."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.test_distributed import run_scenario


def test_submit_script_copied_alone_trains_on_the_cluster(tmp_path):
    result, _ = run_scenario("submit", tmp_path)
    assert result["returncode"] == 0, result["stderr"] + result["stdout"]
    # one worker per node: the head and the two worker nodes all have CPUs
    assert f"{result['nodes']} data-parallel workers" in result["stdout"]
    assert "done: 1 epochs" in result["stdout"]
    run = Path(result["run_dir"])
    history = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [0]
    model = torch.load(run / "model.pt", weights_only=True)
    assert model["arch"] == "cnn" and model["size"] == 32
    assert (run / "ray_run.json").is_file() and (run / "last.pt").is_file()
