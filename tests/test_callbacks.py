"""Device placement, normalisation, stats, recorder, schedules, progress and metrics files."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.tiny_training import (
    MEAN,
    STD,
    make_batches,
    one_torch_thread,  # noqa: F401 (fixture)
    sgd,
    tiny_cnn,
)
from trainer.callbacks import (
    AvgStatsCallback,
    Callback,
    DeviceCallback,
    MetricsLogger,
    NormalizeCallback,
    ParamScheduler,
    ProgressCallback,
    Recorder,
    SmoothLoss,
)
from trainer.learner import DataPair, Learner
from trainer.schedules import one_cycle, sched_cos, sched_lin

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def probe(event, fn, order=90):
    """A callback calling `fn(learn)` at `event` (late, by default), and what it returned."""
    seen = []
    cb = type("Probe", (Callback,), {event: lambda self, learn: seen.append(fn(learn)),
                                     "order": order})()
    return cb, seen


def learner(n_train=3, n_valid=2, cbs=(), lr=0.1, opt_func=sgd, sizes=None, model=None):
    data = DataPair(make_batches(n_train, seed=1, sizes=sizes), make_batches(n_valid, seed=2))
    return Learner(model or tiny_cnn(), data, F.cross_entropy, opt_func, lr=lr,
                   cbs=[DeviceCallback("cpu"), NormalizeCallback(MEAN, STD), *cbs])


# --- device and normalisation ----------------------------------------------------------

def test_device_defaults_to_cuda_when_present_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert DeviceCallback().device.type == expected


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_on_model_and_batches(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cb, seen = probe("after_pred", lambda learn: (learn.xb.dtype, learn.xb.device.type,
                                                  learn.xb.is_contiguous(memory_format=fmt)))
    learn = Learner(tiny_cnn(), (make_batches(2), None), F.cross_entropy, sgd,
                    cbs=[DeviceCallback("cpu", channels_last=channels_last),
                         NormalizeCallback(MEAN, STD), cb])
    learn.fit(1)
    assert seen == [(torch.float32, "cpu", True)] * 2
    assert learn.model[0].weight.is_contiguous(memory_format=fmt)


def test_normalize_matches_the_formula_and_meta_stats():
    batches = make_batches(1)
    cb, seen = probe("after_pred", lambda learn: learn.xb.clone(), order=90)
    norm = NormalizeCallback.from_stats({"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.1]})
    learn = Learner(tiny_cnn(), (batches, None), F.cross_entropy, sgd, cbs=[norm, cb])
    learn.fit(1)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.1]).view(1, 3, 1, 1)
    expected = (batches[0].images.float() / 255 - mean) / std
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)


def test_normalize_refuses_wrong_inputs():
    with pytest.raises(ValueError, match="std"):
        NormalizeCallback([0.5] * 3, [0.2, 0.0, 0.2])
    floats = [type(b)(b.images.float(), b.labels, b.keys) for b in make_batches(1)]
    learn = Learner(tiny_cnn(), (floats, None), F.cross_entropy, sgd,
                    cbs=[NormalizeCallback(MEAN, STD)])
    with pytest.raises(TypeError, match="uint8"):
        learn.fit(1)
    learn = Learner(tiny_cnn(), (make_batches(1), None), F.cross_entropy, sgd,
                    cbs=[NormalizeCallback([0.5], [0.2])])
    with pytest.raises(ValueError, match="channels"):
        learn.fit(1)


# --- stats -------------------------------------------------------------------------------

def test_avg_stats_are_batch_size_weighted():
    sizes = [5, 11, 2]
    learn = learner(n_train=3, sizes=sizes, lr=0.0, cbs=[AvgStatsCallback()])
    learn.data = DataPair(learn.data.train, make_batches(3, seed=2, sizes=[7, 1, 4]))
    per_batch_train = []
    cb, _ = probe("after_loss", lambda learn: per_batch_train.append(
        (learn.loss.item(), learn.yb.shape[0])) if learn.training else None)
    learn.fit(1, cbs=[cb])
    row = learn.history[0]
    assert set(row) == {"epoch", "train_loss", "train_accuracy", "valid_loss", "accuracy",
                        "train_samples", "seconds", "data_wait", "images_per_s"}
    assert row["train_samples"] == sum(sizes)
    expected_train = sum(loss * n for loss, n in per_batch_train) / sum(sizes)
    assert row["train_loss"] == pytest.approx(expected_train, rel=1e-5)

    # Validation: recompute over all samples at once with the (unchanged, lr=0) model.
    model = learn.model.eval()
    norm = NormalizeCallback(MEAN, STD)
    x = torch.cat([b.images for b in learn.data.valid]).float().sub_(norm.shift).div_(norm.scale)
    y = torch.cat([b.labels for b in learn.data.valid])
    with torch.no_grad():
        out = model(x)
    assert row["valid_loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert row["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item(), rel=1e-6)
    assert row["seconds"] >= 0


def test_metrics_logger_writes_json_and_csv_every_epoch(tmp_path):
    counts = []
    cb, _ = probe("after_epoch", lambda learn: counts.append(
        len(json.loads((tmp_path / "metrics.json").read_text()))), order=99)
    learn = learner(cbs=[AvgStatsCallback(), MetricsLogger(tmp_path)])
    learn.fit(3, cbs=[cb])
    assert counts == [1, 2, 3]  # rewritten after each epoch, not only at the end
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"epoch", "train_loss", "valid_loss", "accuracy", "seconds"} <= set(r)
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["valid_loss"]) for r in table] == pytest.approx([r["valid_loss"]
                                                                     for r in rows])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.json"]


# --- recorder ----------------------------------------------------------------------------

def test_smooth_loss_is_a_debiased_ema():
    smooth = SmoothLoss(beta=0.9)
    assert smooth.add(2.0) == pytest.approx(2.0)  # debiasing: the first value is exact
    assert smooth.add(4.0) == pytest.approx((0.09 * 2 + 0.1 * 4) / (1 - 0.81))


def test_recorder_records_losses_hypers_and_saves_plots(tmp_path):
    losses = []
    cb, _ = probe("after_loss", lambda learn: losses.append(learn.loss.item())
                  if learn.training else None)
    rec = Recorder(plot_dir=tmp_path, beta=0.98)
    learn = learner(n_train=4, cbs=[AvgStatsCallback(), rec])
    sched = ParamScheduler({"lr": sched_lin(0.1, 0.01)})
    learn.fit(2, cbs=[cb, sched])
    assert rec.losses == pytest.approx(losses)
    avg, expected = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = 0.98 * avg + 0.02 * loss
        expected.append(avg / (1 - 0.98**i))
    assert rec.smooth_losses == pytest.approx(expected)
    assert rec.hypers["lr"] == pytest.approx([0.1 + (e + i / 4) / 2 * (0.01 - 0.1)
                                              for e in range(2) for i in range(4)])
    assert rec.hypers["momentum"] == [0.9] * 8
    assert rec.epoch_ends == [4, 8]
    assert rec.valid_losses == [row["valid_loss"] for row in learn.history]
    for name in ("loss.png", "schedule.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size[0] > 100


# --- schedules ---------------------------------------------------------------------------

def test_param_scheduler_writes_any_hyper_per_batch_from_pct_train():
    cycle = one_cycle(0.2, pct_start=0.3)
    scheds = {"lr": cycle["lr"], "momentum": cycle["mom"]}  # torch.optim's name for it
    cb, seen = probe("before_step", lambda learn: (learn.pct_train,
                                                   learn.opt.param_groups[0]["lr"],
                                                   learn.opt.param_groups[0]["momentum"]))
    learn = learner(n_train=5, cbs=[cb])
    learn.fit(3, cbs=[ParamScheduler(scheds)])
    assert len(seen) == 15
    for pos, lr, mom in seen:
        assert lr == pytest.approx(scheds["lr"](pos)) and mom == pytest.approx(
            scheds["momentum"](pos))
    lrs = [lr for _, lr, _ in seen]
    assert max(lrs) == pytest.approx(0.2, rel=0.05) and lrs[0] == pytest.approx(0.2 / 25)


def test_param_scheduler_per_group_and_broadcast():
    def splitter(model):
        return [{"params": list(model[:2].parameters())},
                {"params": list(model[2:].parameters())}]

    cb, seen = probe("before_step", lambda learn: [g["lr"] for g in learn.opt.param_groups])
    data = (make_batches(2), None)
    learn = Learner(tiny_cnn(), data, F.cross_entropy, sgd,
                    cbs=[NormalizeCallback(MEAN, STD), cb], splitter=splitter)
    learn.fit(1, cbs=[ParamScheduler({"lr": [sched_cos(0.01, 0.02), sched_cos(0.1, 0.2)]})])
    assert seen[0] == pytest.approx([0.01, 0.1])
    assert seen[1] == pytest.approx([sched_cos(0.01, 0.02)(0.5), sched_cos(0.1, 0.2)(0.5)])
    seen.clear()
    learn.fit(1, cbs=[ParamScheduler({"lr": sched_lin(0.3, 0.4)})])
    assert seen == [pytest.approx([0.3, 0.3]), pytest.approx([0.35, 0.35])]
    with pytest.raises(ValueError, match="2 param groups"):
        learn.fit(1, cbs=[ParamScheduler({"lr": [sched_lin(1, 2)] * 3})])


def test_param_scheduler_refuses_a_hyper_the_optimizer_lacks():
    learn = learner()
    with pytest.raises(ValueError, match="'mom'.*momentum"):
        learn.fit(1, cbs=[ParamScheduler({"mom": sched_lin(0.9, 0.8)})])


# --- progress ----------------------------------------------------------------------------

def test_progress_prints_plain_lines_off_a_terminal():
    lines = []
    learn = learner(cbs=[AvgStatsCallback(), ProgressCallback(bars=False, write=lines.append)])
    learn.fit(2)
    assert len(lines) == 3
    header = lines[0].split()
    assert header == ["epoch", "train_loss", "train_accuracy", "valid_loss", "accuracy",
                      "train_samples", "time", "data_wait", "images_per_s"]
    for epoch, line in enumerate(lines[1:]):
        cells = line.split()
        assert cells[0] == str(epoch)
        assert float(cells[3]) == pytest.approx(learn.history[epoch]["valid_loss"], abs=1e-6)


def test_progress_bars_write_the_table_through_the_master_bar(capsys):
    learn = learner(cbs=[AvgStatsCallback(), ProgressCallback(bars=True)])
    learn.fit(2)
    learn.fit(3, start_epoch=2)  # a resumed run's bar starts at its first epoch
    out = capsys.readouterr().out
    assert out.count("train_loss") == 2 and "valid_loss" in out and "accuracy" in out
    assert "Epoch 1/2" in out and "Epoch 3/3" in out
    assert "100.00% [3/3" in out and "100.00% [2/2" in out  # child bars sized per pass
    assert "[0/?" not in out and "150.00%" not in out
    assert f"{learn.history[-1]['valid_loss']:.6f}" in out
