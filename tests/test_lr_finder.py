"""The LR finder: exponential sweep, divergence stop, exact restore, suggestion, plot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.batch import Batch
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
    NormalizeCallback,
    lr_find,
    valley,
)
from trainer.learner import Learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LrWatch(Callback):
    order = 90

    def __init__(self):
        self.lrs, self.valid_batches = [], 0

    def before_step(self, learn):
        self.lrs.append(learn.opt.param_groups[0]["lr"])

    def after_pred(self, learn):
        self.valid_batches += not learn.training


def learner(n_train=10, cbs=()):
    return Learner(tiny_cnn(), (make_batches(n_train, seed=1), make_batches(2, seed=2)),
                   F.cross_entropy, sgd, lr=0.05,
                   cbs=[NormalizeCallback(MEAN, STD), AvgStatsCallback(), *cbs])


def test_sweep_is_exponential_spans_epochs_and_skips_validation():
    watch = LrWatch()
    learn = learner(n_train=10, cbs=[watch])
    result = lr_find(learn, start_lr=1e-5, end_lr=1e-1, num_it=25, stop_div=False)
    expected = [1e-5 * (1e-1 / 1e-5) ** (i / 24) for i in range(25)]
    # the 25th batch stops the sweep after its loss, before its step
    assert watch.lrs == pytest.approx(expected[:24])
    assert result.lrs == pytest.approx(expected)
    assert len(result.losses) == 25 and watch.valid_batches == 0
    assert 1e-5 <= result.suggestion <= 1e-1


def test_sweep_stops_when_the_loss_diverges():
    # Random labels on 2x2 images cannot be fitted, so a large lr makes the loss blow up
    # (on the separable task the loss keeps falling even at lr 1e4).
    gen = torch.Generator().manual_seed(3)
    batches = [Batch(b.images, torch.randint(0, 3, b.labels.shape, generator=gen), b.keys)
               for b in make_batches(10, size=2)]
    learn = Learner(tiny_cnn(), (batches, None), F.cross_entropy, sgd,
                    cbs=[NormalizeCallback(MEAN, STD)])
    result = lr_find(learn, start_lr=1e-4, end_lr=1e4, num_it=200)
    assert len(result.losses) < 200
    last = result.losses[-1]
    assert not math.isfinite(last) or last > 4 * min(result.losses)
    assert 1e-4 <= result.suggestion < result.lrs[-1]


def test_model_optimizer_history_and_rng_are_restored_exactly():
    learn = learner()
    learn.fit(1)  # so the optimizer has momentum buffers and the history a row
    model_before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_before = learn.opt.state_dict()
    opt_before = {"state": {k: {n: t.clone() for n, t in s.items()}
                            for k, s in opt_before["state"].items()},
                  "param_groups": [dict(g) for g in opt_before["param_groups"]]}
    history_before = list(learn.history)
    torch.manual_seed(5)
    rng_before = torch.get_rng_state()

    lr_find(learn, num_it=30)

    assert state_equal(model_before, learn.model.state_dict())  # BN buffers included
    opt_after = learn.opt.state_dict()
    assert opt_after["param_groups"] == opt_before["param_groups"]
    for key, state in opt_before["state"].items():
        assert torch.equal(state["momentum_buffer"], opt_after["state"][key]["momentum_buffer"])
    assert learn.history == history_before
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_finder_before_any_fit_leaves_a_fresh_optimizer():
    learn = learner()
    lr_find(learn, num_it=12)
    assert len(learn.opt.state) == 0
    assert all(g["lr"] == 0.05 for g in learn.opt.param_groups)


def test_plot_is_saved(tmp_path):
    learn = learner()
    lr_find(learn, num_it=20, plot_path=tmp_path / "lr_find.png")
    with Image.open(tmp_path / "lr_find.png") as img:
        assert img.format == "PNG"


def test_refuses_to_run_next_to_a_checkpoint(tmp_path):
    learn = learner(cbs=[CheckpointCallback(tmp_path)])
    with pytest.raises(ValueError, match="checkpoint"):
        lr_find(learn, num_it=12)
    assert not (tmp_path / "last.pt").exists()


def test_valley_picks_a_point_down_the_longest_descent():
    losses = [3.0] * 10 + [3.0 - 0.04 * i for i in range(1, 51)] + [1.0 + 0.2 * i
                                                                    for i in range(1, 20)]
    index = valley(losses)
    assert 10 < index < 59  # inside the descent, before the minimum at 59
    assert index == pytest.approx(10 + 50 / 2, abs=3)
