"""Every metrics row says how long training waited for data and how many images/s it ran.

Real batches, a real model and real gradient steps; the slow stream really sleeps.
"""

from __future__ import annotations

import csv
import time

import pytest
import torch.nn.functional as F

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
    ProgressCallback,
)
from trainer.learner import DataPair, Learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DELAY = 0.05  # seconds the slow stream sleeps before each batch


class SlowStream:
    """Batches held in memory, each handed out only after `delay` seconds: a starved loop."""

    def __init__(self, batches: list, delay: float = DELAY):
        self.batches, self.delay = batches, delay

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def fit_rows(train, valid, epochs: int = 2, cbs=()) -> list[dict]:
    learn = Learner(tiny_cnn(), DataPair(train, valid), F.cross_entropy, sgd, lr=0.1,
                    cbs=[DeviceCallback("cpu"), NormalizeCallback(MEAN, STD), AvgStatsCallback(),
                         *cbs])
    learn.fit(epochs)
    return learn.history


def test_rows_have_data_wait_and_images_per_s():
    train = make_batches(4, bs=8, seed=1, sizes=[8, 8, 8, 5])
    rows = fit_rows(train, make_batches(2, seed=2))
    for row in rows:
        assert row["data_wait"] >= 0
        assert row["data_wait"] < 0.05  # batches already in memory: next() costs microseconds
        # seconds are rounded to the ms: the images it implies are off by at most that much
        rate, seconds = row["images_per_s"], row["seconds"]
        assert rate * (seconds - 0.0005) - 0.1 <= 29 <= rate * (seconds + 0.0005) + 0.1


def test_a_slow_training_stream_shows_as_data_wait():
    train = SlowStream(make_batches(6, bs=8, seed=1))
    rows = fit_rows(train, make_batches(2, seed=2))
    for row in rows:
        assert 6 * DELAY <= row["data_wait"] <= row["seconds"]
        assert row["images_per_s"] <= 48 / (6 * DELAY)  # the sleeps bound the throughput


def test_a_slow_validation_stream_is_not_training_wait():
    rows = fit_rows(make_batches(4, seed=1), SlowStream(make_batches(6, seed=2)))
    for row in rows:
        assert row["data_wait"] < 0.05
        assert row["seconds"] >= 6 * DELAY  # the epoch's time includes validation


def test_metrics_csv_has_the_columns(tmp_path):
    fit_rows(make_batches(3, seed=1), make_batches(2, seed=2), cbs=[MetricsLogger(tmp_path)])
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert all(float(r["data_wait"]) >= 0 and float(r["images_per_s"]) > 0 for r in rows)


def test_progress_bar_and_table_show_images_per_s():
    lines: list[str] = []
    comments: list[str] = []
    progress = ProgressCallback(bars=True, write=lines.append)
    peek = type("Peek", (Callback,), {"order": 61, "after_batch": lambda self, learn:
                                      comments.append(progress.pbar.comment)
                                      if learn.training else None})()
    rows = fit_rows(make_batches(3, seed=1), make_batches(2, seed=2), epochs=1,
                    cbs=[progress, peek])
    assert comments and all(c.endswith("images/s") for c in comments)
    assert rows[0]["images_per_s"] > 0

    plain: list[str] = []
    fit_rows(make_batches(3, seed=1), make_batches(2, seed=2), epochs=1,
             cbs=[ProgressCallback(bars=False, write=plain.append)])
    header, row = plain[0].split(), plain[1].split()
    assert header[-2:] == ["data_wait", "images_per_s"]
    assert float(row[-1]) > 0 and row[-1].isdigit()  # a whole number of images/s
