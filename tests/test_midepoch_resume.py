"""Mid-epoch checkpoints and resume (`tench fit --checkpoint-every N`, `--checkpoint-minutes M`).

In-process: a real ShardStream (real Ray actors), a tiny model with BatchNorm and Dropout,
MixUp and the one-cycle schedule, stopped at several steps and resumed from `last.pt` into a
new learner: weights, optimizer and metrics equal the uninterrupted run's. End to end: real
`tench fit` processes SIGKILLed at a random moment, right after a step, and halfway through
writing a checkpoint, each resumed with `--resume`: the final model is bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.stream import ShardStream
from shards.sample import make_sample
from shards.sharder import shard_folder
from tests.shard_fixtures import make_shards
from tests.tiny_training import MEAN, STD, sgd, state_equal, tiny_cnn
from trainer.callbacks import (
    AvgStatsCallback,
    Callback,
    CheckpointCallback,
    DeviceCallback,
    MixUp,
    NormalizeCallback,
    ParamScheduler,
    StepCheckpoint,
    load_checkpoint,
    resume_position,
)
from trainer.learner import DataPair, Learner
from trainer.schedules import one_cycle

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2


# ----------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 50 training samples, batches of 4 with drop_last: 12 batches (48 samples) an epoch
    return make_shards(tmp_path_factory.mktemp("mid") / "shards", {"train": 50, "valid": 12},
                       samples_per_shard=8).folder


class Stop(Exception):
    """Stands in for the process dying after a training step."""


class StopAfter(Callback):
    order = 100  # after StepCheckpoint

    def __init__(self, step: int):
        self.step = step

    def after_batch(self, learn) -> None:
        if learn.training and learn.epoch * learn.n_iter + learn.iter + 1 == self.step:
            raise Stop


def learner(shards: Path, folder: Path, seed: int, every: int | None = 3,
            minutes: float | None = None) -> tuple[Learner, StepCheckpoint]:
    def stream(split):
        return ShardStream(shards, split, batch_size=4, size=16, seed=5, num_actors=2,
                           drop_last=split == "train")

    torch.manual_seed(seed)
    cnn = tiny_cnn(seed=seed)
    model = nn.Sequential(*cnn[:-1], nn.Dropout(0.3), cnn[-1])  # dropout draws torch's RNG
    step = StepCheckpoint(folder, every=every, minutes=minutes)
    cbs = [DeviceCallback("cpu"), NormalizeCallback(MEAN, STD), AvgStatsCallback(),
           MixUp(0.4, seed=1), CheckpointCallback(folder), step]
    return Learner(model, DataPair(stream("train"), stream("valid")), F.cross_entropy, sgd,
                   lr=0.1, cbs=cbs), step


def schedule() -> ParamScheduler:
    cycle = one_cycle(0.1, pct_start=0.3)
    return ParamScheduler({"lr": cycle["lr"], "momentum": cycle["mom"]})


def close(learn: Learner) -> None:
    for stream in learn.data:
        stream.close()


def rows(history: list[dict]) -> list[dict]:
    timing = {"seconds", "data_wait", "images_per_s"}  # wall-clock readings differ run to run
    return [{k: v for k, v in row.items() if k not in timing} for row in history]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    learn, step = learner(shards, tmp_path_factory.mktemp("full"), seed=0)
    try:
        learn.fit(EPOCHS, cbs=[schedule()])
    finally:
        close(learn)
    # steps 3, 6, 9 of each 12-step epoch (never its last step: the epoch's own checkpoint)
    assert len(step.write_seconds) == 6
    return learn


# where each stop leaves last.pt: (epoch, training batches done), "end" for epoch 0's own
# checkpoint. Right after a checkpoint (3, 15), just before one (5), at an epoch's last step
# (12: its epoch checkpoint comes after validation, so the resume redoes steps 10-12), after
# the epoch checkpoint (14).
SAVED_AT = {3: (0, 3), 5: (0, 3), 12: (0, 9), 14: "end", 15: (1, 3)}


@pytest.mark.parametrize("stop_at", sorted(SAVED_AT))
def test_resume_mid_epoch_is_bit_identical(shards, tmp_path, uninterrupted, stop_at):
    learn, _ = learner(shards, tmp_path, seed=0)
    try:
        with pytest.raises(Stop):
            learn.fit(EPOCHS, cbs=[schedule(), StopAfter(stop_at)])
    finally:
        close(learn)
    saved = SAVED_AT[stop_at]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    if saved == "end":
        assert ckpt["epoch"] == 0 and "mid_epoch" not in ckpt
        epoch, batches = 1, 0
    else:
        epoch, batches = saved
        assert ckpt["mid_epoch"]["epoch"] == epoch and ckpt["mid_epoch"]["batches"] == batches
        assert ckpt["epoch"] == epoch - 1  # the last completed epoch, as in every checkpoint

    torch.manual_seed(99)  # a new process: other RNG state, other initial weights
    resumed, _ = learner(shards, tmp_path, seed=7)
    try:
        start_epoch, start_iter = resume_position(resumed, ckpt)
        assert (start_epoch, start_iter) == (epoch, batches)
        resumed.fit(EPOCHS, cbs=[schedule()], start_epoch=start_epoch, start_iter=start_iter)
    finally:
        close(resumed)
    assert state_equal(resumed.model.state_dict(), uninterrupted.model.state_dict())
    for key, state in uninterrupted.opt.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"],
                           resumed.opt.state_dict()["state"][key]["momentum_buffer"])
    assert rows(resumed.history) == rows(uninterrupted.history)
    assert [r["train_samples"] for r in resumed.history] == [48] * EPOCHS  # 50 less drop_last


def test_checkpoint_minutes_writes_by_time(shards, tmp_path):
    learn, step = learner(shards, tmp_path, seed=0, every=None, minutes=1e-9)
    try:
        learn.fit(1, cbs=[schedule(), StopAfter(4)])
    except Stop:
        pass
    finally:
        close(learn)
    assert len(step.write_seconds) == 4  # after every step: the time is always up
    assert load_checkpoint(tmp_path / "last.pt")["mid_epoch"]["batches"] == 4
    with pytest.raises(ValueError, match="M > 0"):
        StepCheckpoint(tmp_path, minutes=0)


# ----------------------------------------------------------------------------- tench fit
FIT_ARGS = ["--arch", "cnn", "--epochs", str(EPOCHS), "--batch-size", "4", "--size", "16",
            "--actors", "1", "--seed", "3", "--opt", "adam", "--lr", "3e-3", "--mixup", "0.4",
            "--checkpoint-every", "4"]
STEPS = 15  # 60 training samples, batches of 4


def child(kill: str, *args: str) -> subprocess.Popen:
    """`tench fit` that SIGKILLs itself as `kill` says (tests/midepoch_child.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.midepoch_child", kill, "--", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the Ray helpers a killed run leaves
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def fit_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitmid")
    make_sample(root / "images", per_class=6, valid_per_class=2, seed=0)
    shard_folder(root / "images", root / "shards", processes=1, progress=False)
    return root


def test_tench_fit_killed_three_ways_resumes_bit_identical(fit_data):
    shards = str(fit_data / "shards")
    full, run = fit_data / "full", fit_data / "killed"
    code, _, err = finish(child("none", shards, "--out", str(full), *FIT_ARGS))
    assert code == 0, err

    # 1. SIGKILL from outside at a random moment once the first checkpoint is there
    proc = child("none", shards, "--out", str(run), *FIT_ARGS)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    time.sleep(float(torch.rand(1)) * 0.1)  # the run ends within ~1 s of its first checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL and not (run / "model.pt").exists()

    # 2. resumed, then killed halfway through writing its second checkpoint
    code, out, err = finish(child("write:2", shards, "--out", str(run), "--resume"))
    assert code == -signal.SIGKILL, err
    assert list(run.glob(".last.pt.*.partial"))  # the interrupted write's temp file
    kept = load_checkpoint(run / "last.pt")  # still the previous, complete checkpoint

    # 3. resumed (the partial file is cleared), then killed three steps after a checkpoint
    saved = 4 * ((STEPS + 4) // 4)  # the first checkpoint of epoch 1 (step 16 = batch 1)
    code, out, err = finish(child(f"step:{saved + 3}", shards, "--out", str(run), "--resume"))
    assert code == -signal.SIGKILL, err
    if kept.get("mid_epoch"):
        mid = kept["mid_epoch"]
        assert f"resuming epoch {mid['epoch']} at training batch {mid['batches']}" in out
    assert not list(run.glob(".last.pt.*.partial"))
    mid = load_checkpoint(run / "last.pt")["mid_epoch"]
    assert (mid["epoch"], mid["batches"]) == divmod(saved, STEPS)
    assert len(mid["streams"]) == 1 and mid["streams"][0]["batches"] == mid["batches"]

    # 4. resumed to the end: redoes only the 3 steps since the checkpoint
    code, out, err = finish(child("none", shards, "--out", str(run), "--resume"))
    assert code == 0, err
    assert f"resuming epoch 1 at training batch {saved - STEPS}" in out
    resumed = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    reference = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    assert state_equal(resumed, reference)
    metrics = json.loads((run / "metrics.json").read_text())
    assert rows(metrics) == rows(json.loads((full / "metrics.json").read_text()))
    assert [r["epoch"] for r in metrics] == [0, 1]
    assert [r["train_samples"] for r in metrics] == [60, 60]
