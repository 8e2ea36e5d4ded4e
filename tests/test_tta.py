"""Test-time augmentation after the last epoch: the mean of the centre crop's and its flip's
softmax, recorded as `accuracy_tta`, with the model left as it was.

Real batches and a real model trained by real steps; one `tench fit` run on real shards.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from shards.sample import make_sample
from shards.sharder import shard_folder
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
    DeviceCallback,
    NormalizeCallback,
    TestTimeAugmentation,
)
from trainer.callbacks.tta import tta_probabilities
from trainer.config import FitConfig
from trainer.fit import run_fit
from trainer.learner import DataPair, Learner
from trainer.run_dir import summary_line


@pytest.mark.usefixtures("one_torch_thread")
def test_tta_probabilities_are_the_mean_of_both_views():
    model = tiny_cnn().eval()
    x = make_batches(1, bs=6, size=12)[0].images.float() / 255
    with torch.no_grad():
        plain, flipped = model(x).softmax(1), model(torch.flip(x, dims=[3])).softmax(1)
        got = tta_probabilities(model, x)
    assert not torch.allclose(plain, flipped)  # the flip matters for these images
    assert torch.allclose(got, (plain + flipped) / 2, atol=1e-6)


@pytest.mark.usefixtures("one_torch_thread")
def test_accuracy_tta_on_a_tiny_run():
    valid = make_batches(3, bs=10, seed=2)
    before_tta = {}

    class Snapshot(Callback):
        order = 61  # after the stats, before TTA (62)

        def after_epoch(self, learn):
            before_tta.update({k: v.clone() for k, v in learn.model.state_dict().items()})

    learn = Learner(tiny_cnn(), DataPair(make_batches(4, seed=1), valid), F.cross_entropy, sgd,
                    lr=0.1, cbs=[DeviceCallback("cpu"), NormalizeCallback(MEAN, STD),
                                 AvgStatsCallback(), TestTimeAugmentation(), Snapshot()])
    learn.fit(2)
    first, last = learn.history
    assert "accuracy_tta" not in first
    assert state_equal(learn.model.state_dict(), before_tta)  # TTA changed no weight or BN stat

    model, norm = learn.model.eval(), NormalizeCallback(MEAN, STD)
    x = torch.cat([b.images for b in valid]).float().sub_(norm.shift).div_(norm.scale)
    y = torch.cat([b.labels for b in valid])
    with torch.no_grad():
        probs = (F.softmax(model(x), 1) + F.softmax(model(x.flip(3)), 1)) / 2
    assert last["accuracy_tta"] == pytest.approx((probs.argmax(1) == y).float().mean().item())


@pytest.mark.ray
def test_fit_with_tta_records_and_prints_it(ray_local, tmp_path):
    make_sample(tmp_path / "images", per_class=3, valid_per_class=2, seed=0)
    shard_folder(tmp_path / "images", tmp_path / "shards", processes=1, progress=False)
    config = FitConfig(shards=str(tmp_path / "shards"), out=str(tmp_path / "run"), epochs=2,
                       batch_size=8, size=32, tta=True, device="cpu", arch="cnn",
                       lsuv=False, lr=3e-3)
    summary = run_fit(config)
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "accuracy_tta" not in rows[0] and 0 <= rows[1]["accuracy_tta"] <= 1
    assert summary["accuracy_tta"] == rows[1]["accuracy_tta"]
    assert f"({rows[1]['accuracy_tta']:.1%} with TTA)" in summary_line(summary)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tta"] is True
