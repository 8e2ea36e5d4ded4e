"""Mid-epoch resume of data-parallel runs on a real multi-node Ray cluster, one per process.

Run by `tests/test_distributed_resume.py` (`python tests/resume_scenarios.py SCENARIO
WORKDIR`), like `tests/cluster_scenarios.py`, whose cluster and fault helpers it uses. Every
rank logs each training batch it trains on (epoch, batch index, keys, process) to a JSON
lines file, so the test sees what was trained before and after the interruption.

- `node`: a node running a rank is removed at epoch 1, batch 4 (checkpoints every 3 steps).
- `elastic`: a 2-worker run fails at epoch 1, batch 4 with no restarts left; it is resumed
  with 3 workers (`run_distributed` with `resume=True`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from tests.cluster_scenarios import make_shards, remove_a_training_node, start_cluster
from trainer.callbacks import Callback
from trainer.config import FitConfig

FAULT_EPOCH, FAULT_BATCH, EVERY = 1, 4, 3


class LogSteps(Callback):
    """Append `{"epoch", "iter", "keys", "rank", "world", "pid"}` per training batch."""

    order = 80

    def __init__(self, folder: str, rank: int, world_size: int):
        self.path = Path(folder) / f"steps-rank{rank}-of{world_size}.jsonl"
        self.rank, self.world_size = rank, world_size

    def after_batch(self, learn) -> None:
        if learn.training:
            line = {"epoch": learn.epoch, "iter": learn.iter, "keys": list(learn.batch.keys),
                    "rank": self.rank, "world": self.world_size, "pid": os.getpid()}
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")


class FailOnce(Callback):
    """Raise at one batch of one epoch, on every rank, once (a marker file remembers)."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def after_batch(self, learn) -> None:
        if (learn.training and learn.epoch == FAULT_EPOCH and learn.iter == FAULT_BATCH
                and not self.marker.exists()):
            import time

            time.sleep(3)  # let Ray Train's controller register the last checkpoint
            self.marker.write_text("failed")
            raise RuntimeError("injected failure")


class Steps:
    """Picklable `(rank, world_size) -> callbacks`: LogSteps plus an optional fault."""

    def __init__(self, folder: str, fault: Callback | None = None):
        self.folder, self.fault = folder, fault

    def __call__(self, rank: int, world_size: int) -> list:
        return [LogSteps(self.folder, rank, world_size)] + ([self.fault] if self.fault else [])



class MidEpochNodeLoss(Callback):
    """At one batch of one epoch, ask the scenario to remove this rank's node, once.

    Unlike cluster_scenarios.NodeLoss (which waits for an epoch's checkpoint to be
    registered), the checkpoint to wait for here is a mid-epoch one, which Ray Train's
    snapshot does not tell apart; so this one still gives the controller 3 s to register
    it (open: wait on the event, as #17 asks of the other scenarios).
    """

    def __init__(self, folder: str, epoch: int, batch: int):
        self.folder, self.epoch, self.batch = Path(folder), epoch, batch

    def after_batch(self, learn) -> None:
        import ray
        import ray.train

        removed = self.folder / "removed.txt"
        if (learn.training and learn.epoch == self.epoch and learn.iter == self.batch
                and not removed.exists()):
            time.sleep(3)
            node = ray.get_runtime_context().get_node_id()
            rank = ray.train.get_context().get_world_rank()
            (self.folder / f"request-rank{rank}.txt").write_text(f"{node} {os.getpid()}")
            deadline = time.monotonic() + 120
            while not removed.exists() and time.monotonic() < deadline:
                time.sleep(0.2)

def main(scenario: str, work: Path) -> None:
    from trainer.distributed import ClusterOptions, run_distributed

    shards = make_shards(work)
    cluster, _ = start_cluster(3 if scenario == "node" else 2)
    base = FitConfig(shards=str(shards), arch="cnn_nobn", epochs=2, batch_size=4, lr=3e-3,
                     size=32, actors=1, opt="adam", checkpoint_every=EVERY)
    steps = work / "steps"
    steps.mkdir()
    result: dict = {"shards": str(shards), "steps": str(steps)}
    try:
        if scenario == "node":
            requests = work / "node_requests"
            requests.mkdir()
            watcher = threading.Thread(target=remove_a_training_node,
                                       args=(cluster, requests, result), daemon=True)
            watcher.start()
            loss = MidEpochNodeLoss(str(requests), epoch=FAULT_EPOCH, batch=FAULT_BATCH)
            summary = run_distributed(base.replace(out=str(work / "run")),
                                      ClusterOptions(num_workers=2, max_failures=2,
                                                     placement="spread"),
                                      Steps(str(steps), loss))
            watcher.join(timeout=1)
            result.update(summary=summary)
        elif scenario == "elastic":
            config = base.replace(out=str(work / "run"))
            fail = FailOnce(str(work / "failed.txt"))
            try:
                run_distributed(config, ClusterOptions(num_workers=2, max_failures=0,
                                                       placement="spread"),
                                Steps(str(steps), fail))
                result["first_failed"] = False
            except Exception as e:  # Ray Train's TrainingFailedError, once no restart is left
                result["first_failed"] = type(e).__name__
            summary = run_distributed(config.replace(resume=True),
                                      ClusterOptions(num_workers=3, max_failures=0,
                                                     placement="spread"),
                                      Steps(str(steps)))
            result.update(summary=summary)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
