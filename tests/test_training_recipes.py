"""The Learner with tench's own pieces: the course CNN, the generic optimizer (hyper 'mom'),
one-cycle schedules, checkpoints, the LR finder and the fp16 GradScaler path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from shards.vocab import Vocab
from tests.tiny_training import (
    MEAN,
    STD,
    make_batches,
    one_torch_thread,  # noqa: F401 (fixture)
    state_equal,
)
from trainer import optim
from trainer.callbacks import (
    AvgStatsCallback,
    Callback,
    CheckpointCallback,
    DeviceCallback,
    MixedPrecision,
    NonFiniteGuard,
    NormalizeCallback,
    ParamScheduler,
    Recorder,
    load_checkpoint,
    lr_find,
    restore,
)
from trainer.learner import DataPair, Learner
from trainer.models import create_model
from trainer.schedules import one_cycle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = Vocab(["a", "b", "c"])


def build(opt_func, folder=None, seed=0, cbs=()):
    torch.manual_seed(seed)
    model = create_model("cnn", n_classes=3)
    data = DataPair(make_batches(4, bs=8, size=16, seed=1), make_batches(2, bs=8, size=16, seed=2))
    extra = [CheckpointCallback(folder, {"arch": "cnn"}, VOCAB)] if folder else []
    return Learner(model, data, F.cross_entropy, opt_func, lr=3e-3,
                   cbs=[DeviceCallback("cpu"), NormalizeCallback(MEAN, STD), AvgStatsCallback(),
                        NonFiniteGuard(), *extra, *cbs])


def adam(params, lr):
    return optim.adam(params, lr, wd=1e-2)


def ranger(params, lr):
    return optim.ranger(params, lr)


class Crash(Exception):
    pass


class CrashAt(Callback):
    order = 100

    def __init__(self, epoch):
        self.epoch = epoch

    def after_batch(self, learn):
        if learn.training and learn.epoch == self.epoch and learn.iter == 2:
            raise Crash


@pytest.mark.parametrize("opt_func", [adam, ranger], ids=["adam", "ranger"])
def test_resume_is_bit_identical_with_the_generic_optimizer(tmp_path, opt_func):
    def schedule():
        return ParamScheduler(one_cycle(3e-3, pct_start=0.3))  # writes 'lr' and 'mom'

    full = build(opt_func)
    full.fit(3, cbs=[schedule()])

    crashed = build(opt_func, tmp_path)
    with pytest.raises(Crash):
        crashed.fit(3, cbs=[schedule(), CrashAt(epoch=1)])

    resumed = build(opt_func, tmp_path, seed=42)
    start = restore(resumed, load_checkpoint(tmp_path / "last.pt", VOCAB.fingerprint))
    assert start == 1
    resumed.fit(3, cbs=[schedule()], start_epoch=start)

    assert state_equal(full.model.state_dict(), resumed.model.state_dict())
    assert full.opt.param_groups[0]["mom"] == resumed.opt.param_groups[0]["mom"]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # generic state loads safely
    assert ckpt["epoch"] == 2 and ckpt["optimizer"]["state"]


def test_one_cycle_drives_lr_and_mom_of_the_generic_optimizer():
    rec = Recorder()
    learn = build(lambda params, lr: optim.sgd(params, lr, mom=0.9), cbs=[rec])
    cycle = one_cycle(0.05, pct_start=0.25)
    learn.fit(2, cbs=[ParamScheduler(cycle)])
    positions = [(e + i / 4) / 2 for e in range(2) for i in range(4)]
    assert rec.hypers["lr"] == pytest.approx([cycle["lr"](p) for p in positions])
    assert rec.hypers["mom"] == pytest.approx([cycle["mom"](p) for p in positions])


def test_lr_find_restores_the_generic_optimizer_exactly():
    learn = build(adam)
    learn.fit(1)
    model_before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_before = copy.deepcopy(learn.opt.state_dict())  # state_dict() shares live tensors
    result = lr_find(learn, num_it=10)
    assert 1e-7 <= result.suggestion <= 10
    assert state_equal(model_before, learn.model.state_dict())
    opt_after = learn.opt.state_dict()
    assert opt_after["param_groups"] == opt_before["param_groups"]
    for key, state in opt_before["state"].items():
        for name, value in state.items():
            after = opt_after["state"][key][name]
            assert torch.equal(value, after) if torch.is_tensor(value) else value == after


def test_fp16_grad_scaler_works_with_the_generic_optimizer():
    amp = MixedPrecision(torch.float16, cpu=True, init_scale=2.0**20)
    learn = build(adam, cbs=[amp])
    learn.fit(3)
    assert 1 <= amp.skipped_steps < 12
    assert amp.scaler.get_scale() == 2.0**20 * 0.5**amp.skipped_steps
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert learn.opt.state  # the steps that were not skipped did update the optimizer
