"""Per-epoch loss and metrics (batch-size weighted), and the files they are logged to.

`AvgStatsCallback` appends one dict per epoch to `learn.history`:
`{"epoch", "train_loss", "train_<metric>"..., "valid_loss", "<metric>"..., "train_samples",
"seconds", "data_wait", "images_per_s"}`: `train_samples` is the samples the epoch trained
on (across a mid-epoch resume), `data_wait` the seconds the training pass waited for its
next batch (the Learner's `data_wait`; a large share of `seconds` means a starved device)
and `images_per_s` the training images of the epoch (all ranks') over its `seconds`;
`MetricsLogger` writes that list to the run folder's metrics files after every epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from trainer.callbacks.core import Callback
from trainer.callbacks.device import model_device
from trainer.run_dir import write_metrics

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose highest-scoring class is the target."""
    return (pred.argmax(dim=1) == target).float().mean()


class RunningAverage:
    """Batch-size weighted sums of the loss and metrics, kept on the device.

    Summing on the device avoids a GPU->CPU sync per batch; `averages()` syncs once.
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, values: list[torch.Tensor], batch_size: int) -> None:
        batch = torch.stack([v.detach().float() for v in values])
        if self.sums is None:
            self.sums = batch * batch_size
        else:
            self.sums.add_(batch, alpha=batch_size)
        self.count += batch_size

    def averages(self) -> list[float] | None:
        if self.sums is None or self.count == 0:
            return None
        return (self.sums / self.count).tolist()


class AvgStatsCallback(Callback):
    """Average loss and metrics over each training and validation pass."""

    order = 40

    def __init__(self, metrics: Mapping[str, Metric] | None = None):
        self.metrics = dict({"accuracy": accuracy} if metrics is None else metrics)
        self.train, self.valid = RunningAverage(), RunningAverage()
        self.start, self.epoch, self.train_wait = 0.0, 0, 0.0
        self._resume: dict | None = None  # a mid-epoch checkpoint's partial sums

    def state_dict(self) -> dict:
        """The training pass's partial sums so far: a run resumed mid-epoch logs the same
        epoch averages as an uninterrupted one."""
        sums = None if self.train.sums is None else self.train.sums.detach().cpu().clone()
        return {"epoch": self.epoch, "sums": sums, "count": self.train.count,
                "seconds": time.perf_counter() - self.start}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def before_epoch(self, learn) -> None:
        self.train, self.valid = RunningAverage(), RunningAverage()
        self.start, self.epoch, self.train_wait = time.perf_counter(), learn.epoch, 0.0
        saved, self._resume = self._resume, None
        if saved is not None and saved["epoch"] == learn.epoch and learn.mid_epoch_resume:
            sums = saved["sums"]
            self.train.sums = None if sums is None else sums.to(model_device(learn.model))
            self.train.count = int(saved["count"])
            self.start -= float(saved["seconds"])

    def after_train(self, learn) -> None:
        self.train_wait = learn.data_wait

    def after_loss(self, learn) -> None:
        with torch.no_grad():
            values = [learn.loss] + [m(learn.pred, learn.yb) for m in self.metrics.values()]
        (self.train if learn.training else self.valid).add(values, learn.yb.shape[0])

    def after_epoch(self, learn) -> None:
        names = ["loss", *self.metrics]
        row: dict = {"epoch": learn.epoch}
        self.epoch = learn.epoch
        train, valid = self.train.averages(), self.valid.averages()
        for i, name in enumerate(names):
            row[f"train_{name}"] = None if train is None else train[i]
        for i, name in enumerate(names):
            row["valid_loss" if name == "loss" else name] = None if valid is None else valid[i]
        seconds = time.perf_counter() - self.start
        row["train_samples"] = self.train.count
        row["seconds"] = round(seconds, 3)
        row["data_wait"] = round(self.train_wait, 3)
        row["images_per_s"] = round(self.train.count / seconds, 1) if seconds > 0 else None
        learn.history.append(row)


class MetricsLogger(Callback):
    """Rewrite `metrics.json` (a list, one object per epoch) and `metrics.csv` each epoch.

    Both are written atomically, so a run killed mid-write leaves the previous epoch's
    complete files. Reads `learn.history`, so it runs after `AvgStatsCallback`.
    """

    order = 65

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def before_fit(self, learn) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def after_epoch(self, learn) -> None:
        write_metrics(self.folder, learn.history)
