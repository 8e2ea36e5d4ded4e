"""The learning-rate finder: an exponential lr sweep that leaves the learner as it found it.

lr_i = start_lr * (end_lr / start_lr) ** (i / (num_it - 1)) for batch i; the sweep stops at
`num_it` batches or when the smoothed loss exceeds 4x the best seen (divergence). Afterwards
the model, the optimizer, `learn.history` and the torch RNG are restored exactly, and an lr
is suggested with fastai's "valley" rule.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.callbacks.checkpoint import CheckpointCallback
from trainer.callbacks.core import Callback, CancelFit, CancelValidate
from trainer.callbacks.recorder import SmoothLoss, new_figure, save_figure
from trainer.callbacks.stats import MetricsLogger


def valley(losses: Sequence[float]) -> int:
    """Index of the suggested lr, given the losses of an lr sweep in increasing-lr order.

    Finds the longest strictly decreasing subsequence of the losses and takes the point
    about halfway along it (start + len/3 + len/6, as fastai does): far enough down the
    slope to learn fast, well before the minimum where the loss turns up.
    """
    n = len(losses)
    if n == 0:
        raise ValueError("valley needs at least one loss")
    run = [1] * n  # run[i]: longest decreasing subsequence ending at i
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[best_end]:
            best_end = i
    start = best_end - run[best_end] + 1
    third = (best_end - start) / 3
    return start + int(third) + int(third / 2)


@dataclass
class LRFindResult:
    suggestion: float
    lrs: list[float] = field(repr=False)
    losses: list[float] = field(repr=False)  # smoothed


class LRFinder(Callback):
    """Sweep the lr of every param group; restore everything after fit.

    Refuses to run next to callbacks that persist a run (checkpoints, metric logs), which
    would otherwise record the sweep as if it were training.
    """

    order = 20

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                 stop_div: bool = True, plot_path: str | Path | None = None, beta: float = 0.98):
        if not 0 < start_lr < end_lr:
            raise ValueError(f"LRFinder needs 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
        if num_it < 2:
            raise ValueError(f"LRFinder needs num_it >= 2, got {num_it}")
        self.start_lr, self.end_lr, self.num_it = start_lr, end_lr, num_it
        self.stop_div = stop_div
        self.plot_path = None if plot_path is None else Path(plot_path)
        self.smooth = SmoothLoss(beta)
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.suggestion: float | None = None

    def before_fit(self, learn) -> None:
        persisting = [cb for cb in learn.cbs if isinstance(cb, CheckpointCallback | MetricsLogger)]
        if persisting:
            raise ValueError(
                f"LRFinder would record its sweep through {persisting}; run it on a learner "
                "without checkpoint or metrics-log callbacks"
            )
        self.saved_model = copy.deepcopy(learn.model.state_dict())
        self.saved_opt = copy.deepcopy(learn.opt.state_dict())
        self.saved_history = copy.deepcopy(learn.history)
        self.saved_rng = torch.get_rng_state()
        self.lrs, self.losses, self.best = [], [], math.inf
        self.smooth.reset()
        self.suggestion = None

    def before_batch(self, learn) -> None:
        if not learn.training:
            return
        lr = self.start_lr * (self.end_lr / self.start_lr) ** (len(self.lrs) / (self.num_it - 1))
        for group in learn.opt.param_groups:
            group["lr"] = lr
        self.lrs.append(lr)

    def after_loss(self, learn) -> None:
        if not learn.training:
            return
        smooth = self.smooth.add(learn.loss.item())
        self.losses.append(smooth)
        self.best = min(self.best, smooth)
        diverged = not math.isfinite(smooth) or smooth > 4 * self.best
        if len(self.losses) >= self.num_it or (self.stop_div and diverged):
            raise CancelFit

    def before_validate(self, learn) -> None:
        raise CancelValidate  # the sweep only needs training batches

    def after_fit(self, learn) -> None:
        learn.model.load_state_dict(self.saved_model)
        learn.opt.load_state_dict(self.saved_opt)
        learn.history = self.saved_history
        torch.set_rng_state(self.saved_rng)
        del self.saved_model, self.saved_opt
        pairs = zip(self.lrs, self.losses, strict=False)  # a cancelled batch has an lr, no loss
        finite = [(lr, loss) for lr, loss in pairs if math.isfinite(loss)]
        if finite:
            lrs, losses = zip(*finite, strict=True)
            self.suggestion = float(lrs[valley(losses)])
        if self.plot_path is not None and finite:
            self.plot(self.plot_path)

    def plot(self, path: str | Path) -> Path:
        fig, (ax,) = new_figure()
        ax.plot(self.lrs[: len(self.losses)], self.losses)
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="red", linestyle="--",
                       label=f"suggested lr {self.suggestion:.2e}")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss (smoothed)")
        return save_figure(fig, path)


def lr_find(learn, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
            stop_div: bool = True, plot_path: str | Path | None = None) -> LRFindResult:
    """Run the sweep on `learn` (enough epochs for `num_it` batches) and suggest an lr."""
    finder = LRFinder(start_lr, end_lr, num_it, stop_div, plot_path)
    n_train = len(learn.data.train) if hasattr(learn.data.train, "__len__") else num_it
    if n_train == 0:
        raise ValueError("lr_find: the training stream is empty")
    learn.fit(max(1, math.ceil(num_it / n_train)), cbs=[finder])
    if finder.suggestion is None:
        raise RuntimeError("lr_find: no finite loss was recorded; check the data and model")
    return LRFindResult(finder.suggestion, finder.lrs[: len(finder.losses)], finder.losses)
