"""Checkpoints: bit-identical resume, weights-only loading, vocab refusal, atomic writes,
and the NaN guard that keeps the last good checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shards.vocab import Vocab
from tests.tiny_training import (
    MEAN,
    STD,
    make_batches,
    one_torch_thread,  # noqa: F401 (fixture)
    sgd,
    state_equal,
    tiny_cnn,
)
from trainer.callbacks import (
    AvgStatsCallback,
    Callback,
    CheckpointCallback,
    CheckpointError,
    DeviceCallback,
    NonFiniteGuard,
    NonFiniteLossError,
    NormalizeCallback,
    ParamScheduler,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from trainer.callbacks.checkpoint import CHECKPOINT_VERSION
from trainer.learner import DataPair, Learner
from trainer.schedules import combine_scheds, one_cycle, sched_no

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = Vocab(["cat", "dog", "tench"])
CONFIG = {"arch": "tiny", "lr": 0.2, "epochs": 4}


def model_with_dropout(seed: int) -> nn.Module:
    """BatchNorm (running stats) and Dropout (draws from the torch RNG every batch)."""
    model = tiny_cnn(seed=seed)
    return nn.Sequential(*model[:-1], nn.Dropout(0.3), model[-1])


def build(folder, seed=0, cbs=()):
    data = DataPair(make_batches(4, seed=1), make_batches(2, seed=2))
    return Learner(model_with_dropout(seed), data, F.cross_entropy, sgd, lr=0.2,
                   cbs=[DeviceCallback("cpu"), NormalizeCallback(MEAN, STD), AvgStatsCallback(),
                        NonFiniteGuard(), CheckpointCallback(folder, CONFIG, VOCAB), *cbs])


def schedule():
    cycle = one_cycle(0.2, pct_start=0.3)
    return ParamScheduler({"lr": cycle["lr"], "momentum": cycle["mom"]})


class Killed(Exception):
    """Stands in for the process dying (kill -9) in the middle of an epoch."""


class KillAt(Callback):
    order = 100

    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def after_step(self, learn):
        if learn.epoch == self.epoch and learn.iter == self.batch:
            raise Killed


def test_resume_after_a_crash_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    torch.manual_seed(123)
    full = build(tmp_path / "full")
    full.fit(4, cbs=[schedule()])

    torch.manual_seed(123)
    crashed = build(tmp_path / "crashed")
    with pytest.raises(Killed):
        crashed.fit(4, cbs=[schedule(), KillAt(epoch=2, batch=1)])  # epochs 0, 1 completed

    torch.manual_seed(999)  # a new process: other RNG state, other initial weights
    resumed = build(tmp_path / "crashed", seed=7)
    ckpt = load_checkpoint(tmp_path / "crashed" / "last.pt", VOCAB.fingerprint)
    start = restore(resumed, ckpt)
    assert start == 2 and ckpt["epoch"] == 1
    resumed.fit(4, cbs=[schedule()], start_epoch=start)

    assert state_equal(full.model.state_dict(), resumed.model.state_dict())
    full_opt, resumed_opt = full.opt.state_dict(), resumed.opt.state_dict()
    assert full_opt["param_groups"] == resumed_opt["param_groups"]
    for key, state in full_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed_opt["state"][key]["momentum_buffer"])
    losses = [(r["epoch"], r["train_loss"], r["valid_loss"]) for r in full.history]
    assert [(r["epoch"], r["train_loss"], r["valid_loss"]) for r in resumed.history] == losses
    final = load_checkpoint(tmp_path / "crashed" / "last.pt")
    assert final["epoch"] == 3 and state_equal(final["model"], full.model.state_dict())


def test_checkpoint_layout_loads_weights_only(tmp_path):
    learn = build(tmp_path)
    learn.fit(2, cbs=[schedule()])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(ckpt) == {"format_version", "epoch", "schedule", "model", "optimizer", "rng",
                         "history", "config", "vocab", "vocab_fingerprint", "callbacks"}
    assert ckpt["format_version"] == CHECKPOINT_VERSION and ckpt["epoch"] == 1
    assert ckpt["schedule"] == {"n_epochs": 2, "pct_train": 1.0}
    assert ckpt["config"] == CONFIG
    assert ckpt["vocab"] == VOCAB.names and ckpt["vocab_fingerprint"] == VOCAB.fingerprint
    assert state_equal(ckpt["model"], learn.model.state_dict())
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert [r["epoch"] for r in ckpt["history"]] == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary files left


def test_a_checkpoint_from_another_vocab_is_refused(tmp_path):
    build(tmp_path).fit(1)
    other = Vocab(["cat", "dog", "trout"])
    with pytest.raises(CheckpointError, match="different label vocab") as info:
        load_checkpoint(tmp_path / "last.pt", other.fingerprint)
    assert "last.pt" in str(info.value)
    assert load_checkpoint(tmp_path / "last.pt", VOCAB.fingerprint)["epoch"] == 0

    learn = Learner(tiny_cnn(), (make_batches(1), None), F.cross_entropy, sgd,
                    cbs=[NormalizeCallback(MEAN, STD), CheckpointCallback(tmp_path / "novocab")])
    learn.fit(1)
    with pytest.raises(CheckpointError, match="different label vocab"):
        load_checkpoint(tmp_path / "novocab" / "last.pt", VOCAB.fingerprint)


def test_unreadable_or_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    build(tmp_path).fit(1)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    save_checkpoint(tmp_path / "old.pt", {"format_version": 0})
    with pytest.raises(CheckpointError, match="format 0"):
        load_checkpoint(tmp_path / "old.pt")
    torch.save({"format_version": CHECKPOINT_VERSION, "evil": Vocab(["a"])}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="obj.pt"):  # weights_only refuses objects
        load_checkpoint(tmp_path / "obj.pt")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    build(tmp_path).fit(1)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - torch.save fails part-way through pickling
        save_checkpoint(tmp_path / "last.pt", {"model": torch.zeros(3), "bad": lambda: 0})
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(CheckpointError, match="JSON"):
        learn = build(tmp_path / "other")
        learn.fit(1, cbs=[CheckpointCallback(tmp_path / "other", config={"path": tmp_path})])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    explode = ParamScheduler({"lr": combine_scheds([1 / 3, 2 / 3], [sched_no(0.1),
                                                                    sched_no(1e20)])})
    good = {}

    class Snapshot(Callback):
        order = 99

        def after_epoch(self, learn):
            good[learn.epoch] = {k: v.clone() for k, v in learn.model.state_dict().items()}

    learn = build(tmp_path, cbs=[Snapshot()])
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1") as info:
        learn.fit(3, cbs=[explode])
    assert "lower learning rate" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 0 and list(good) == [0]
    assert state_equal(ckpt["model"], good[0])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_guard_refuses_to_let_nan_weights_reach_a_checkpoint(tmp_path):
    class Poison(Callback):
        order = 44  # after the last step of epoch 1, before the guard and the checkpoint

        def after_epoch(self, learn):
            if learn.epoch == 1:
                with torch.no_grad():
                    learn.model[-1].weight[0, 0] = float("inf")

    learn = build(tmp_path, cbs=[Poison()])
    with pytest.raises(NonFiniteLossError, match="weights became NaN/inf during epoch 1"):
        learn.fit(3)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0
    metrics = json.loads(json.dumps(learn.history))
    assert [r["epoch"] for r in metrics] == [0, 1]
