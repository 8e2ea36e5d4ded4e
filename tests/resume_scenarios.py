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
from pathlib import Path

from tests.cluster_scenarios import (
    NodeLoss,
    make_shards,
    remove_a_training_node,
    start_cluster,
    wait_for_checkpoint,
)
from trainer.callbacks import Callback
from trainer.config import FitConfig

FAULT_EPOCH, FAULT_BATCH, EVERY = 1, 4, 3
CHECKPOINT_BATCHES = 3  # the last checkpoint before the fault: step 9, epoch 1's 3rd batch


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
    """Raise at one batch of one epoch, on every rank, once (a marker file remembers), after
    Ray Train's controller has registered the checkpoint before it."""

    def __init__(self, marker: str, run_dir: str):
        self.marker, self.run_dir = Path(marker), Path(run_dir)

    def after_batch(self, learn) -> None:
        if (learn.training and learn.epoch == FAULT_EPOCH and learn.iter == FAULT_BATCH
                and not self.marker.exists()):
            wait_for_checkpoint(self.run_dir, FAULT_EPOCH, CHECKPOINT_BATCHES)
            self.marker.write_text("failed")
            raise RuntimeError("injected failure")


class Steps:
    """Picklable `(rank, world_size) -> callbacks`: LogSteps plus an optional fault."""

    def __init__(self, folder: str, fault: Callback | None = None):
        self.folder, self.fault = folder, fault

    def __call__(self, rank: int, world_size: int) -> list:
        return [LogSteps(self.folder, rank, world_size)] + ([self.fault] if self.fault else [])



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
            loss = NodeLoss(str(requests), str(work / "run"), epoch=FAULT_EPOCH,
                            batch=FAULT_BATCH, checkpoint=(FAULT_EPOCH, CHECKPOINT_BATCHES))
            summary = run_distributed(base.replace(out=str(work / "run")),
                                      ClusterOptions(num_workers=2, max_failures=2,
                                                     placement="spread"),
                                      Steps(str(steps), loss))
            watcher.join(timeout=60)  # until it has seen whether the victim's process ended
            result.update(summary=summary, survived=(requests / "survived.txt").is_file())
        elif scenario == "elastic":
            config = base.replace(out=str(work / "run"))
            fail = FailOnce(str(work / "failed.txt"), str(work / "run"))
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
