"""Data-parallel scenarios on a real multi-node Ray cluster on this machine, one per process.

Run by `tests/test_distributed.py` in a subprocess (`python tests/cluster_scenarios.py
SCENARIO WORKDIR`), so the pytest process's own Ray is never shut down under other tests.
Each scenario starts `ray.cluster_utils.Cluster` (a head and two worker nodes, all on
127.0.0.1), trains, and prints one JSON line `RESULT {...}` for the test to check.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from shards.sample import make_sample
from shards.sharder import shard_folder
from trainer.callbacks import Callback
from trainer.config import FitConfig


class RecordBatches(Callback):
    """Save every training batch this rank sees (uint8 images, labels, keys), per epoch."""

    order = 80

    def __init__(self, folder: str, rank: int):
        self.folder, self.rank = Path(folder), rank
        self.batches: dict = {}

    def after_batch(self, learn) -> None:
        if learn.training:
            b = learn.batch
            self.batches.setdefault(learn.epoch, []).append(
                (b.images.clone(), b.labels.clone(), list(b.keys)))

    def after_epoch(self, learn) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.batches.get(learn.epoch, []),
                   self.folder / f"epoch{learn.epoch}-rank{self.rank}.pt")


class Recorder:
    """Picklable `(rank, world_size) -> callbacks` factory for `run_distributed`."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, rank: int, world_size: int) -> list:
        return [RecordBatches(self.folder, rank)]


class KillOnce(Callback):
    """Kill this worker process at one batch of one epoch, once (a marker file remembers)."""

    def __init__(self, marker: str, epoch: int, batch: int):
        self.marker, self.epoch, self.batch = Path(marker), epoch, batch

    def after_batch(self, learn) -> None:
        if (learn.training and learn.epoch == self.epoch and learn.iter == self.batch
                and not self.marker.exists()):
            # Ray Train's controller collects reports by polling: give it a moment to see
            # the previous epoch's checkpoint (a real failure comes minutes into an epoch).
            time.sleep(3)
            self.marker.write_text(str(os.getpid()))
            os._exit(1)


class RecordAndKill(Recorder):
    def __init__(self, folder: str, marker: str):
        super().__init__(folder)
        self.marker = marker

    def __call__(self, rank: int, world_size: int) -> list:
        cbs = super().__call__(rank, world_size)
        return cbs + ([KillOnce(self.marker, epoch=1, batch=1)] if rank == 1 else [])


def make_shards(work: Path) -> Path:
    shards = work / "shards"
    if not (shards / "meta.json").is_file():
        make_sample(work / "images", per_class=5, valid_per_class=2, seed=0)
        shard_folder(work / "images", shards, shard_size=20, workers=1, progress=False,
                     stats_images=50)
    return shards


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=True, configure_logging=False)
    return cluster, nodes


def submit(work: Path, shards: Path, address: str) -> dict:
    """Run trainer/submit.py as `ray submit` does on the head node: the file alone, copied to
    a temporary folder, run from there with RAY_ADDRESS set (tench from the installed package).
    """
    import shutil
    import subprocess
    import tempfile

    import trainer

    script = Path(trainer.__file__).parent / "submit.py"
    with tempfile.TemporaryDirectory(prefix="ray-submit-") as folder:
        copied = Path(shutil.copy(script, folder))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["RAY_ADDRESS"] = address
        out = work / "run_submit"
        proc = subprocess.run(
            [sys.executable, copied.name, str(shards), "--out", str(out), "--workers-per-node",
             "1", "--arch", "cnn", "--epochs", "1", "--bs", "6", "--size", "32"],
            cwd=folder, env=env, capture_output=True, text=True, timeout=240)
    return {"returncode": proc.returncode, "stdout": proc.stdout[-3000:],
            "stderr": proc.stderr[-3000:], "run_dir": str(out), "nodes": 3}


def main(scenario: str, work: Path) -> None:
    from tests.shard_fixtures import serve_s3
    from trainer.distributed import ClusterOptions, run_distributed

    spread2 = ClusterOptions(num_workers=2, max_failures=2, placement="SPREAD")
    shards = make_shards(work)
    s3 = serve_s3(shards)
    s3_url, options = s3.__enter__()
    # credentials and endpoint "from the usual environment", set before the nodes start so
    # every raylet, worker and stream actor inherits them
    os.environ.update(AWS_ACCESS_KEY_ID=options["key"], AWS_SECRET_ACCESS_KEY=options["secret"],
                      AWS_ENDPOINT_URL=options["endpoint_url"], AWS_DEFAULT_REGION="us-east-1")
    cluster, _ = start_cluster()
    base = FitConfig(shards=str(shards), arch="cnn_nobn", epochs=2, bs=7, lr=3e-3, size=32,
                     workers=1, opt="adam")
    result: dict = {"shards": str(shards)}
    try:
        if scenario == "two_workers":
            record = work / "record"
            summary = run_distributed(base.replace(out=str(work / "run2")),
                                      spread2, Recorder(str(record)))
            result.update(summary=summary, record=str(record))
            from_s3 = run_distributed(base.replace(out=str(work / "run_s3"), shards=s3_url),
                                      spread2)
            result.update(s3_summary=from_s3, s3_url=s3_url)
        elif scenario == "kill_worker":
            record = work / "record_kill"
            marker = work / "killed.txt"
            summary = run_distributed(base.replace(out=str(work / "run_kill")),
                                      spread2,
                                      RecordAndKill(str(record), str(marker)))
            result.update(summary=summary, record=str(record), killed=marker.is_file())
        elif scenario == "submit":
            result.update(submit(work, shards, cluster.address))
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        s3.__exit__(None, None, None)
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
