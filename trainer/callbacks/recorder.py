"""Record the loss, its smoothed value and the hyper-parameters of every training batch.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global
backend switch) and written atomically as PNG files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from shards.atomic import atomic_write_bytes
from trainer.callbacks.core import Callback
from trainer.run_dir import LOSS_PLOT_NAME, SCHEDULE_PLOT_NAME


class SmoothLoss:
    """Debiased exponential moving average of the loss (fastai's smooth loss).

    avg <- beta * avg + (1 - beta) * loss; value = avg / (1 - beta ** n). Without the
    division the first values would be pulled towards the zero the average starts from.
    """

    def __init__(self, beta: float = 0.98):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"smoothing beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self.avg, self.count, self.value = 0.0, 0, math.nan

    def add(self, loss: float) -> float:
        self.count += 1
        self.avg = self.beta * self.avg + (1.0 - self.beta) * loss
        self.value = self.avg / (1.0 - self.beta**self.count)
        return self.value


def new_figure(n_plots: int = 1, width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_plots, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_plots, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG atomically (never a half-written image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


class Recorder(Callback):
    """Per training batch: loss, smoothed loss and the last param group's `hypers`.

    With `plot_dir`, `loss.png` and `schedule.png` are written there after fit.
    """

    order = 50  # after AvgStatsCallback, whose history row it reads at the end of an epoch

    def __init__(self, plot_dir: str | Path | None = None,
                 hypers: Sequence[str] = ("lr", "mom", "momentum"), beta: float = 0.98):
        self.plot_dir = None if plot_dir is None else Path(plot_dir)
        self.hyper_names = tuple(hypers)
        self.smooth = SmoothLoss(beta)
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.smooth_losses: list[float] = []
        self.hypers: dict[str, list[float]] = {}
        self.epoch_ends: list[int] = []  # number of batches recorded when each epoch ended
        self.valid_losses: list[float | None] = []
        self.smooth.reset()

    def before_fit(self, learn) -> None:
        self.reset()
        group = learn.opt.param_groups[-1]
        self.hypers = {n: [] for n in self.hyper_names if isinstance(group.get(n), (int, float))}

    def after_loss(self, learn) -> None:
        if not learn.training:
            return
        loss = learn.loss.item()
        self.losses.append(loss)
        self.smooth_losses.append(self.smooth.add(loss))
        group = learn.opt.param_groups[-1]
        for name, values in self.hypers.items():
            values.append(group[name])

    def after_epoch(self, learn) -> None:
        self.epoch_ends.append(len(self.losses))
        last = learn.history[-1] if learn.history else {}
        self.valid_losses.append(last.get("valid_loss") if last.get("epoch") == learn.epoch
                                 else None)

    def after_fit(self, learn) -> None:
        if self.plot_dir is not None and self.losses:
            self.plot_loss(self.plot_dir / LOSS_PLOT_NAME)
            self.plot_schedule(self.plot_dir / SCHEDULE_PLOT_NAME)

    def plot_loss(self, path: str | Path) -> Path:
        fig, (ax,) = new_figure()
        steps = range(1, len(self.losses) + 1)
        ax.plot(steps, self.losses, alpha=0.3, label="train loss")
        ax.plot(steps, self.smooth_losses, label="train loss (smoothed)")
        valid = [(end, v) for end, v in zip(self.epoch_ends, self.valid_losses, strict=True)
                 if v is not None]
        if valid:
            ax.plot([end for end, _ in valid], [v for _, v in valid], "o-", label="valid loss")
        ax.set_xlabel("training batch")
        ax.set_ylabel("loss")
        ax.legend()
        return save_figure(fig, path)

    def plot_schedule(self, path: str | Path) -> Path:
        names = [n for n, v in self.hypers.items() if v] or ["lr"]
        fig, axes = new_figure(len(names))
        for ax, name in zip(axes, names, strict=True):
            ax.plot(range(1, len(self.hypers.get(name, [])) + 1), self.hypers.get(name, []))
            ax.set_xlabel("training batch")
            ax.set_ylabel(name)
        return save_figure(fig, path)
