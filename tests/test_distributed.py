"""Data-parallel `tench fit` on a real 3-node Ray cluster (head + 2 workers, all on 127.0.0.1).

Each scenario runs in its own process (`tests/cluster_scenarios.py`), so this session's
shared Ray (`ray_local`) is left alone. The oracle for DDP is a single-process Learner fed
the very batches the two workers saw, concatenated step by step (the same global batch),
computed with the workers' torch thread count (`same_threads`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.batch import Batch
from shards.format import read_meta
from shards.vocab import Vocab
from trainer.build import make_learner, schedule_callbacks
from trainer.config import FitConfig
from trainer.learner import DataPair

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "cluster_scenarios.py"


def run_scenario(name: str, work: Path, timeout: float = 300,
                 scenarios: Path = SCENARIOS) -> tuple[dict, str]:
    """Run one scenario of `scenarios` in its own process; (its RESULT json, its output)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run([sys.executable, str(scenarios), name, str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), output


def load_records(folder: Path, epoch: int, world_size: int) -> list[list]:
    return [torch.load(folder / f"epoch{epoch}-rank{r}.pt", weights_only=True)
            for r in range(world_size)]


class ListStream:
    """Recorded batches replayed per epoch, with the attributes `make_learner` reads."""

    def __init__(self, per_epoch: dict[int, list[Batch]], vocab: Vocab, stats: dict):
        self.per_epoch, self.vocab, self.stats, self.epoch = per_epoch, vocab, stats, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.per_epoch[self.epoch])

    def __iter__(self):
        return iter(self.per_epoch[self.epoch])


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    work = tmp_path_factory.mktemp("dp")
    return run_scenario("two_workers", work)


def test_every_sample_once_per_epoch_across_workers(two_workers):
    result, output = two_workers
    meta = read_meta(result["shards"])
    n_train = meta["splits"]["train"]["count"]
    record = Path(result["record"])
    for epoch in range(2):
        ranks = load_records(record, epoch, 2)
        keys = [[k for _, _, ks in batches for k in ks] for batches in ranks]
        assert len(keys[0]) == len(keys[1]) == n_train // 2  # equal parts
        assert not set(keys[0]) & set(keys[1])  # disjoint
        assert len(set(keys[0]) | set(keys[1])) == n_train  # together: every sample once
        assert [len(b[2]) for b in ranks[0]] == [len(b[2]) for b in ranks[1]]  # same steps
    # only rank 0 prints the table: no header line comes from a rank-1 process
    def pid(line: str) -> str:
        return line.split("pid=")[1].split(")")[0]

    lines = [x for x in output.splitlines() if "pid=" in x]
    header_pids = {pid(x) for x in lines if "train_loss" in x and "Reporting" not in x}
    rank1_pids = {pid(x) for x in lines if "Reporting training result" in x
                  and x.rstrip().endswith("from rank 1")}
    assert header_pids and rank1_pids and not header_pids & rank1_pids
    run = Path(result["summary"]["run_dir"])
    history = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]


def test_stream_actors_spread_over_the_nodes(two_workers):
    """placement="spread" puts the actors on more than one node; the epoch is still whole."""
    result, _ = two_workers
    assert len(set(result["spread_nodes"])) >= 2
    n_train = read_meta(result["shards"])["splits"]["train"]["count"]
    assert sorted(result["spread_keys"]) == sorted(set(result["spread_keys"]))
    assert len(result["spread_keys"]) == n_train


class PerWorkerBatchNorm(torch.nn.Module):
    """One process doing what N DDP workers do with BatchNorm: in training, each of the N
    equal parts of the global batch goes through the model on its own (batch statistics per
    part), and only the first part's running statistics are kept (DDP broadcasts rank 0's
    buffers before every forward). The loss over the whole output is the mean of the parts'
    mean losses, so its gradient is DDP's average of the workers' gradients."""

    def __init__(self, inner: torch.nn.Module, parts: int):
        super().__init__()
        self.inner, self.parts = inner, parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.inner(x)
        chunks = x.chunk(self.parts)
        outs = [self.inner(chunks[0])]  # updates the running statistics kept
        norms = [m for m in self.inner.modules() if isinstance(m, _BatchNorm)]
        kept = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
        for m in norms:  # the other parts update copies (autograd saved the originals)
            m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
            m.num_batches_tracked = m.num_batches_tracked.clone()
        outs += [self.inner(chunk) for chunk in chunks[1:]]
        for m, (mean, var, count) in zip(norms, kept, strict=True):
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
        return torch.cat(outs)


@contextmanager
def same_threads(record: Path, world_size: int = 2):
    """Run torch with the thread count the workers trained with (`RecordBatches` writes it;
    Ray gives a 1-CPU worker one thread), and give this process's back afterwards.

    CPU kernels (convolution's backward above all) sum in an order that depends on the
    thread count, so 1 and 2 threads differ by ~1e-7. With BatchNorm over a worker's 7
    samples and Adam (whose step divides each gradient by its own running size) that
    grows to ~1e-3 in this run's 8 steps, as large as real mistakes; with the same thread
    count the per-worker reference repeats the workers' arithmetic and agrees exactly.
    """
    threads = {int((record / f"threads-rank{r}.txt").read_text()) for r in range(world_size)}
    assert len(threads) == 1, f"the workers trained with different thread counts: {threads}"
    before = torch.get_num_threads()
    torch.set_num_threads(threads.pop())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_on_the_global_batches(result: dict, run_key: str, record_key: str,
                                per_worker_bn: bool) -> tuple[dict, dict, dict]:
    """(weights the 2 workers trained, one process's on the same global batches, its start)."""
    run = Path(result[run_key]["run_dir"])
    config = FitConfig.from_json((run / "config.json").read_text())
    meta = read_meta(result["shards"])
    record = Path(result[record_key])
    per_epoch = {}
    for epoch in range(config.epochs):
        ranks = load_records(record, epoch, 2)
        per_epoch[epoch] = [
            Batch(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), a[2] + b[2])
            for a, b in zip(ranks[0], ranks[1], strict=True)]
    stream = ListStream(per_epoch, Vocab.from_json(meta), meta["stats"])
    single = config.replace(batch_size=2 * config.batch_size, device="cpu")
    learn = make_learner(single, DataPair(stream, None), None, is_main=False)
    model = learn.model
    if per_worker_bn:
        learn.model = PerWorkerBatchNorm(model, parts=2)
    with same_threads(record):
        learn.fit(single.epochs, cbs=schedule_callbacks(single))
    trained = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    start = make_learner(single, DataPair(stream, None), None, is_main=False).model.state_dict()
    return trained, model.state_dict(), start


def assert_same_weights(trained: dict, reference: dict, start: dict, rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    assert trained.keys() == reference.keys()
    assert sum(not torch.equal(start[k], v) for k, v in reference.items()) >= 4  # it trained
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=rtol, atol=atol, msg=name)


def test_two_workers_equal_one_worker_with_the_global_batch(two_workers):
    """Without BatchNorm (`cnn_nobn`): N workers with batch B train like one process with N*B."""
    result, _ = two_workers
    assert_same_weights(*train_on_the_global_batches(result, "summary", "record",
                                                     per_worker_bn=False))


def test_with_batchnorm_each_worker_normalises_its_own_part(two_workers):
    """With BatchNorm (`cnn`, the default kind of model) the README's exact claim: gradients
    are averaged as with one process and batch N*B, but each worker's BatchNorm takes its
    statistics from its own B samples, and the running statistics kept are rank 0's."""
    result, _ = two_workers
    trained, per_worker, start = train_on_the_global_batches(result, "bn_summary", "bn_record",
                                                             per_worker_bn=True)
    assert any("running_mean" in k for k in trained)  # the model has BatchNorm
    # Weights move ~1e-2 in this run. On the workers' thread count the per-worker reference
    # does the workers' arithmetic (each part through the model alone, gradients halved and
    # summed) and has agreed exactly, running statistics included; so the usual 1e-5, far
    # below what any real mistake leaves: rank 1's running statistics kept instead of rank
    # 0's are ~0.3 away, one BatchNorm over all 2B samples ~0.4 (its weights ~2e-2).
    assert_same_weights(trained, per_worker, start)
    _, global_bn, _ = train_on_the_global_batches(result, "bn_summary", "bn_record",
                                                  per_worker_bn=False)
    assert max_difference(trained, global_bn) > 1e-2  # ...which is not one process's N*B


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - v).abs().max()) for k, v in b.items() if v.is_floating_point())


def assert_epoch_1_redone_whole(result: dict, output: str) -> None:
    """After a failure in epoch 1: the log says it is redone, the run ends with both epochs,
    and the redone epoch still sees every training sample exactly once."""
    assert "resuming from the checkpoint of epoch 0; epoch 1 is redone" in output
    history = json.loads((Path(result["summary"]["run_dir"]) / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]
    meta = read_meta(result["shards"])
    ranks = load_records(Path(result["record"]), 1, 2)
    keys = [k for batches in ranks for _, _, ks in batches for k in ks]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == meta["splits"]["train"]["count"]


def test_a_killed_worker_is_recovered_from_the_last_checkpoint(tmp_path):
    """A worker process dies at the start of epoch 1: the run restarts from epoch 0's
    checkpoint. (A whole node's loss, mid-epoch, is `tests/test_distributed_resume.py`.)"""
    result, output = run_scenario("kill_worker", tmp_path)
    assert result["killed"]
    assert_epoch_1_redone_whole(result, output)


def test_shards_on_s3_train_like_local_shards(two_workers):
    """Shards on an S3-compatible server (moto on 127.0.0.1, credentials and endpoint from
    the AWS_* environment) give the same weights as the same shards on local disk."""
    result, _ = two_workers
    assert result["s3_url"].startswith("s3://")
    local = torch.load(Path(result["summary"]["model"]), weights_only=True)["state_dict"]
    remote = torch.load(Path(result["s3_summary"]["model"]), weights_only=True)["state_dict"]
    assert local.keys() == remote.keys()
    for name in local:
        torch.testing.assert_close(remote[name], local[name], rtol=1e-5, atol=1e-6, msg=name)
    assert result["s3_summary"]["valid_loss"] == pytest.approx(result["summary"]["valid_loss"],
                                                               rel=1e-4)


def test_storage_folders_are_made_absolute_and_urls_kept(tmp_path, monkeypatch):
    """Ray Train's workers run in folders of their own: a relative --storage must not be
    read from there. Object storage URLs pass through unchanged."""
    from trainer.distributed import ClusterOptions, _ray_run

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = FitConfig(shards="shards", out="run")
    assert _ray_run(run_dir, config, ClusterOptions(storage="store"))[0] == str(tmp_path / "store")
    assert _ray_run(run_dir, config, ClusterOptions())[0] == str(run_dir / "ray")
    url = "s3://bucket/tench-checkpoints"
    assert _ray_run(run_dir, config, ClusterOptions(storage=url))[0] == url


def test_every_data_set_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """A relative SHARDS, or a relative further data set of a mix, would be read from each
    worker's own folder: both reach the workers absolute; URLs pass through."""
    from trainer.distributed import for_workers

    monkeypatch.chdir(tmp_path)
    config = for_workers(FitConfig(shards="a", more_shards=("b", "http://host/c/"),
                                   weights=(2, 1, 1)))
    assert config.shards == str(tmp_path / "a")
    assert config.more_shards == (str(tmp_path / "b"), "http://host/c")
