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
from trainer.run_dir import RAY_RUN_NAME


class RecordBatches(Callback):
    """Save every training batch this rank sees (uint8 images, labels, keys), per epoch, and
    the torch thread count it trains with."""

    order = 80

    def __init__(self, folder: str, rank: int):
        self.folder, self.rank = Path(folder), rank
        self.batches: dict = {}

    def before_fit(self, learn) -> None:
        # the test's single-process reference must compute with the same torch thread count:
        # CPU kernels sum in a thread-dependent order (see test_distributed's `same_threads`)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"threads-rank{self.rank}.txt").write_text(str(torch.get_num_threads()))

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


def wait_for_checkpoint(run_dir: Path, epoch: int, batches: int | None = None,
                        timeout: float = 180) -> None:
    """Wait until Ray Train's controller has registered the checkpoint of `epoch` (its end),
    or with `batches`, the mid-epoch one taken after that many batches of `epoch`.

    Workers hand checkpoints over with `ray.train.report`; the controller collects them by
    polling, and once it has registered one it rewrites `checkpoint_manager_snapshot.json`
    in the run's storage folder (Ray Train v2; the folder is in tench's `ray_run.json`).
    A failure before that would resume from an older checkpoint, so the fault waits for it.
    """
    record = json.loads((run_dir / RAY_RUN_NAME).read_text())
    snapshot = Path(record["storage"]) / record["name"] / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (FileNotFoundError, json.JSONDecodeError):  # not yet, or half written
            latest = {}
        if reached(latest.get("metrics", {}), epoch, batches):
            return
        time.sleep(0.1)
    at = f"epoch {epoch}" + (f", batch {batches}" if batches is not None else "")
    raise TimeoutError(f"{snapshot}: Ray Train registered no checkpoint of {at} "
                       f"within {timeout:.0f}s")


def reached(metrics: dict, epoch: int, batches: int | None) -> bool:
    """Is the checkpoint with these metrics at or past the point asked for? An epoch's end
    reports no `batches`; a mid-epoch checkpoint reports how many were done."""
    done = metrics.get("epoch", -1)
    if batches is None:
        return done >= epoch
    if "batches" not in metrics:
        return done >= epoch  # the end of `epoch` is past any batch of it
    return done > epoch or (done == epoch and metrics["batches"] >= batches)


class KillOnce(Callback):
    """Kill this worker process at one batch of one epoch, once (a marker file remembers),
    after Ray Train has registered the previous epoch's checkpoint."""

    def __init__(self, marker: str, run_dir: str, epoch: int, batch: int):
        self.marker, self.run_dir = Path(marker), Path(run_dir)
        self.epoch, self.batch = epoch, batch

    def after_batch(self, learn) -> None:
        if (learn.training and learn.epoch == self.epoch and learn.iter == self.batch
                and not self.marker.exists()):
            wait_for_checkpoint(self.run_dir, self.epoch - 1)
            self.marker.write_text(str(os.getpid()))
            os._exit(1)


class RecordWithFault(Recorder):
    """`Recorder` plus a fault callback (`KillOnce`, `NodeLoss`) on the ranks in `ranks`."""

    def __init__(self, folder: str, fault: Callback, ranks: tuple[int, ...]):
        super().__init__(folder)
        self.fault, self.ranks = fault, ranks

    def __call__(self, rank: int, world_size: int) -> list:
        cbs = super().__call__(rank, world_size)
        return cbs + ([self.fault] if rank in self.ranks else [])


class NodeLoss(Callback):
    """At one batch of one epoch, ask the scenario to remove this rank's node, once.

    Each rank waits for Ray Train to register the previous epoch's checkpoint (or the one given
    as `checkpoint=(epoch, batches)`, a mid-epoch one), writes the id
    of its node and its pid to `folder/request-rank{r}.txt` and waits; the scenario removes
    one of those nodes (`Cluster.remove_node`: its raylet and Ray's processes go, nothing
    signals the training process) and writes the node's id to `folder/removed.txt`. A rank
    on another node then goes on; a rank on the removed node never does: only the node's
    loss can end it (it gives up after `patience` seconds, leaving `folder/survived.txt`).
    """

    def __init__(self, folder: str, run_dir: str, epoch: int, batch: int,
                 patience: float = 240, checkpoint: tuple[int, int | None] | None = None):
        self.folder, self.run_dir = Path(folder), Path(run_dir)
        self.epoch, self.batch, self.patience = epoch, batch, patience
        self.checkpoint = checkpoint or (epoch - 1, None)  # (epoch, batches) to wait for

    def after_batch(self, learn) -> None:
        import ray
        import ray.train

        removed = self.folder / "removed.txt"
        if (learn.training and learn.epoch == self.epoch and learn.iter == self.batch
                and not removed.exists()):
            wait_for_checkpoint(self.run_dir, *self.checkpoint)
            node = ray.get_runtime_context().get_node_id()
            rank = ray.train.get_context().get_world_rank()
            (self.folder / f"request-rank{rank}.txt").write_text(f"{node} {os.getpid()}")
            deadline = time.monotonic() + self.patience
            while time.monotonic() < deadline:
                if removed.exists() and removed.read_text() not in ("", node):
                    return  # another node went: carry on (DDP then waits on the lost rank)
                time.sleep(0.2)
            (self.folder / "survived.txt").write_text(f"{node} {os.getpid()}")
            os._exit(1)


def remove_a_training_node(cluster, folder: Path, result: dict) -> None:
    """Wait for the ranks' requests, remove a worker node that runs one of them, then see
    whether the training process on it ended without any signal from here."""
    import psutil

    head = cluster.head_node.node_id
    nodes = {node.node_id: node for node in cluster.worker_nodes}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        asked = [p.read_text().split() for p in sorted(folder.glob("request-rank*.txt"))]
        victims = [(n, int(pid)) for n, pid in reversed(asked) if n != head and n in nodes]
        if victims:
            victim, pid = victims[0]
            removed_at = time.monotonic()
            cluster.remove_node(nodes[victim], allow_graceful=False)
            (folder / "removed.txt").write_text(victim)
            result.update(removed_node=victim, victim_pid=pid)
            while time.monotonic() - removed_at < 240:
                try:
                    alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive:
                    result["victim_gone_after_s"] = round(time.monotonic() - removed_at, 1)
                    break
                time.sleep(0.2)
            return
        time.sleep(0.2)


def spread_stream(shards: Path) -> dict:
    """A ShardStream with its 3 actors spread over the nodes: where they ran, what came out."""
    from pipeline.stream import ShardStream

    with ShardStream(shards, "train", batch_size=5, size=32, num_actors=3,
                     placement="spread") as stream:
        keys = [k for batch in stream for k in batch.keys]
        nodes = stream.actor_nodes()
    return {"spread_nodes": nodes, "spread_keys": keys}


def make_shards(work: Path) -> Path:
    shards = work / "shards"
    if not (shards / "meta.json").is_file():
        make_sample(work / "images", per_class=5, valid_per_class=2, seed=0)
        shard_folder(work / "images", shards, shard_size=20, processes=1, progress=False,
                     stats_images=50)
    return shards


def start_cluster(worker_nodes: int = 2):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(worker_nodes)]
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

    spread2 = ClusterOptions(num_workers=2, max_failures=2, placement="spread")
    shards = make_shards(work)
    s3 = serve_s3(shards)
    s3_url, options = s3.__enter__()
    # credentials and endpoint "from the usual environment", set before the nodes start so
    # every raylet, worker and stream actor inherits them
    os.environ.update(AWS_ACCESS_KEY_ID=options["key"], AWS_SECRET_ACCESS_KEY=options["secret"],
                      AWS_ENDPOINT_URL=options["endpoint_url"], AWS_DEFAULT_REGION="us-east-1")
    cluster, _ = start_cluster(2)
    base = FitConfig(shards=str(shards), arch="cnn_nobn", epochs=2, batch_size=7, lr=3e-3,
                     size=32, actors=1, opt="adam", lsuv=False)
    result: dict = {"shards": str(shards)}
    try:
        if scenario == "two_workers":
            record = work / "record"
            # SHARDS relative to this process's folder, as a user types it: Ray Train runs
            # the workers elsewhere, so tench must hand them the resolved path
            summary = run_distributed(base.replace(out=str(work / "run2"),
                                                   shards=os.path.relpath(shards)),
                                      spread2, Recorder(str(record)))
            result.update(summary=summary, record=str(record))
            # the same run with BatchNorm (`cnn`): each worker normalises its own part
            bn_record = work / "record_bn"
            bn = run_distributed(base.replace(out=str(work / "run_bn"), arch="cnn"), spread2,
                                 Recorder(str(bn_record)))
            result.update(bn_summary=bn, bn_record=str(bn_record))
            from_s3 = run_distributed(base.replace(out=str(work / "run_s3"), shards=s3_url),
                                      spread2)
            result.update(s3_summary=from_s3, s3_url=s3_url)
            result.update(spread_stream(shards))
        elif scenario == "kill_worker":
            record = work / "record_kill"
            marker = work / "killed.txt"
            run = work / "run_kill"
            kill = KillOnce(str(marker), str(run), epoch=1, batch=1)
            summary = run_distributed(base.replace(out=str(run)), spread2,
                                      RecordWithFault(str(record), kill, ranks=(1,)))
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
