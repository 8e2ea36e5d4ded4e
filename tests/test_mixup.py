"""MixUp as a callback: mixed images and loss in training, plain in validation, reproducible
per epoch (so a resumed run mixes like an uninterrupted one), and training still learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny_training import (
    MEAN,
    STD,
    make_batches,
    one_torch_thread,  # noqa: F401 (fixture)
    sgd,
    state_equal,
    tiny_cnn,
)
from trainer.callbacks import AvgStatsCallback, Callback, MixUp, NormalizeCallback
from trainer.learner import Learner
from trainer.losses import LabelSmoothingCrossEntropy, mix_loss, mixup_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PlainBatch(Callback):
    """Keeps the normalised batch as it is before MixUp touches it."""

    order = -15  # after NormalizeCallback (-20), before MixUp (-10)

    def before_batch(self, learn):
        self.x = learn.xb.clone()


class LossWatch(Callback):
    """Records each batch after MixUp has mixed the images and replaced the loss."""

    order = 0

    def __init__(self, mixup, plain):
        self.mixup, self.plain, self.rows = mixup, plain, []

    def after_loss(self, learn):
        mixed = learn.training
        self.rows.append({
            "training": learn.training, "epoch": learn.epoch, "x_plain": self.plain.x,
            "x": learn.xb.clone(), "y": learn.yb.clone(), "pred": learn.pred.detach(),
            "loss": learn.loss.detach().clone(),
            "lam": self.mixup.lam.clone() if mixed else None,
            "y_perm": self.mixup.y_perm.clone() if mixed else None,
        })


def learner(mixup, loss_func=F.cross_entropy, n_train=3):
    plain = PlainBatch()
    watch = LossWatch(mixup, plain)
    learn = Learner(tiny_cnn(), (make_batches(n_train, seed=1), make_batches(2, seed=2)),
                    loss_func, sgd, lr=0.1,
                    cbs=[NormalizeCallback(MEAN, STD), mixup, plain, watch])
    return learn, watch.rows


def test_training_batches_and_loss_are_mixed_the_same_way():
    mixup = MixUp(alpha=0.4, seed=11)
    learn, rows = learner(mixup)
    learn.fit(2)
    rng = {e: np.random.default_rng((11, e)) for e in range(2)}
    train_rows = [r for r in rows if r["training"]]
    assert len(train_rows) == 6
    for r in train_rows:
        x, _, y_perm, lam = mixup_batch(r["x_plain"], r["y"], 0.4, rng[r["epoch"]])
        torch.testing.assert_close(r["x"], x, rtol=0, atol=0)
        assert torch.equal(r["y_perm"], y_perm) and torch.equal(r["lam"], lam)
        assert (lam >= 0.5).all() and lam.shape == r["y"].shape
        expected = (lam * F.cross_entropy(r["pred"], r["y"], reduction="none")
                    + (1 - lam) * F.cross_entropy(r["pred"], y_perm, reduction="none")).mean()
        torch.testing.assert_close(r["loss"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(train_rows[0]["lam"], train_rows[3]["lam"])  # new draws each epoch


def test_validation_sees_plain_images_and_the_plain_loss():
    learn, rows = learner(MixUp(alpha=0.4))
    learn.fit(1)
    valid_rows = [r for r in rows if not r["training"]]
    assert len(valid_rows) == 2
    for r in valid_rows:
        assert torch.equal(r["x"], r["x_plain"])
        torch.testing.assert_close(r["loss"], F.cross_entropy(r["pred"], r["y"]))


def test_mixes_any_loss_with_a_reduction_such_as_label_smoothing():
    loss_func = LabelSmoothingCrossEntropy(0.1)
    learn, rows = learner(MixUp(alpha=1.0), loss_func=loss_func)
    learn.fit(1)
    r = next(r for r in rows if r["training"])
    expected = mix_loss(loss_func, r["pred"], r["y"], r["y_perm"], r["lam"])
    torch.testing.assert_close(r["loss"], expected)
    assert loss_func.reduction == "mean"  # the learner's loss is left as it was


def test_a_resumed_epoch_mixes_exactly_like_the_uninterrupted_one():
    full, _ = learner(MixUp(alpha=0.4, seed=3))
    full.fit(2)
    part, _ = learner(MixUp(alpha=0.4, seed=3))
    part.fit(2, start_epoch=1)  # same initial weights, so epoch 1 alone differs from full...
    first, _ = learner(MixUp(alpha=0.4, seed=3))
    first.fit(2, cbs=[type("Stop", (Callback,), {"order": 99, "after_epoch": stop_after_0})()])
    first.fit(2, start_epoch=1)  # ...but epoch 0 then epoch 1 in two fits equals one fit
    assert state_equal(first.model.state_dict(), full.model.state_dict())
    assert not state_equal(part.model.state_dict(), full.model.state_dict())


def stop_after_0(self, learn):
    from trainer.callbacks import CancelFit

    if learn.epoch == 0:
        raise CancelFit


def test_training_with_mixup_still_learns():
    learn = Learner(tiny_cnn(), (make_batches(12, seed=1), make_batches(4, seed=2)),
                    F.cross_entropy, sgd, lr=0.1,
                    cbs=[NormalizeCallback(MEAN, STD), MixUp(0.4), AvgStatsCallback()])
    learn.fit(6)
    assert learn.history[-1]["accuracy"] >= 0.9
    assert learn.history[-1]["valid_loss"] < 0.5 * math.log(3)  # untrained: about log(3)


def test_alpha_is_checked():
    with pytest.raises(ValueError, match="alpha"):
        MixUp(alpha=0)
