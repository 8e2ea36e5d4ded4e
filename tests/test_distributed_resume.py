"""Data-parallel mid-epoch resume on a real multi-node Ray cluster (`tests/resume_scenarios.py`):
a removed node costs only the steps since the last checkpoint, and a run interrupted on 2
workers finishes its epoch on 3 with every sample once.

50 training samples, 2 ranks, batches of 4: 25 per rank, so the trainer drops the lone last
sample of each rank (drop_last) and an epoch is 6 steps of 8 samples (48 samples). Checkpoints
every 3 steps: at epoch 1, batch 2 (step 9); the fault comes at epoch 1, batch 4.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.test_distributed import run_scenario as run_cluster_scenario
from trainer.callbacks import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "resume_scenarios.py"
CHECKPOINT_BATCHES = 3  # the checkpoint of step 9: epoch 1 with 3 batches done


def run_scenario(name: str, work: Path) -> tuple[dict, str]:
    return run_cluster_scenario(name, work, timeout=600, scenarios=SCENARIOS)


def steps_of_epoch_1(result: dict) -> list[dict]:
    lines = []
    for path in sorted(Path(result["steps"]).glob("*.jsonl")):
        lines += [json.loads(x) for x in path.read_text().splitlines()]
    return [x for x in lines if x["epoch"] == 1]


def before_and_after(lines: list[dict]) -> tuple[list[dict], list[dict]]:
    """The first attempt's batches and the resumed attempt's, told apart by process id."""
    first_pids = {x["pid"] for x in lines if x["iter"] == 0}
    return ([x for x in lines if x["pid"] in first_pids],
            [x for x in lines if x["pid"] not in first_pids])


def check_epoch_1(result: dict, output: str, first_iter: int) -> tuple[list[dict], list[dict]]:
    """Every sample of epoch 1 trained once: before the checkpoint, or after the resume,
    which starts at batch `first_iter` (not the epoch's start)."""
    before, after = before_and_after(steps_of_epoch_1(result))
    assert after, output[-3000:]
    assert min(x["iter"] for x in after) == first_iter
    kept = [k for x in before if x["iter"] < CHECKPOINT_BATCHES for k in x["keys"]]
    redone = [k for x in after for k in x["keys"]]
    counts = Counter(kept + redone)
    assert max(counts.values()) == 1  # no sample twice
    run_dir = Path(result["summary"]["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [0, 1]
    assert [row["train_samples"] for row in metrics] == [48, len(counts)]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    return before, after


@pytest.mark.timeout(900)
def test_a_removed_node_redoes_only_the_steps_since_the_last_checkpoint(tmp_path):
    """A whole worker node (raylet, its Ray processes, its stream actors) goes mid-epoch.
    Nothing signals the training process on it: only the node's loss ends it, and the run
    goes on from the last checkpoint, mid-epoch."""
    result, output = run_scenario("node", tmp_path)
    assert result.get("removed_node"), output[-3000:]
    assert "victim_gone_after_s" in result, output[-3000:]  # the node's loss ended it
    assert not result["survived"]  # it never gave up waiting and exited by itself
    assert f"resuming epoch 1 at training batch {CHECKPOINT_BATCHES} of 6" in output
    before, after = check_epoch_1(result, output, CHECKPOINT_BATCHES)
    assert len(set(x["iter"] for x in after)) == 3  # batches 3, 4, 5
    # the lost attempt reached batch 4 (the surviving rank may finish batch 5 before DDP sees
    # the loss): only the batches since the checkpoint are redone, 2-3 steps instead of 5-6
    last = max(x["iter"] for x in before)
    assert last in (4, 5)
    redone = {x["iter"] for x in after} & {x["iter"] for x in before}
    assert redone == set(range(CHECKPOINT_BATCHES, last + 1))
    assert {x["world"] for x in after} == {2}


@pytest.mark.timeout(900)
def test_a_run_stopped_on_2_workers_finishes_its_epoch_on_3(tmp_path):
    result, output = run_scenario("elastic", tmp_path)
    assert result["first_failed"], output[-3000:]
    # 3 ranks: 17 samples each, 4 batches an epoch; the 26 samples left are 2 batches each
    assert "resuming epoch 1 at training batch 2 of 4" in output
    before, after = check_epoch_1(result, output, 2)
    assert {x["world"] for x in before} == {2} and {x["world"] for x in after} == {3}
    assert {x["rank"] for x in after} == {0, 1, 2}
