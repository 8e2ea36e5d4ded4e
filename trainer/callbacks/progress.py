"""Progress bars over epochs and batches, and the per-epoch metrics table.

On a terminal: a fastprogress master bar over epochs, a child bar over the batches of each
pass (showing the smoothed training loss and training images/s), and the table written
through the master bar.
Elsewhere (a log file, CI, a pipe): one plain line per epoch, no carriage-return bars.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from fastprogress.fastprogress import format_time

from trainer.callbacks.core import Callback
from trainer.callbacks.recorder import SmoothLoss

# Columns whose floats read better with fewer digits than the losses' six.
FORMATS = {"data_wait": "{:.2f}", "images_per_s": "{:.0f}"}


def format_row(row: dict, names: list[str]) -> list[str]:
    cells = []
    for name in names:
        value = row.get(name)
        if value is None:
            cells.append("")
        elif name == "seconds":
            cells.append(format_time(value))
        elif name in FORMATS:
            cells.append(FORMATS[name].format(value))
        elif isinstance(value, float):
            cells.append(f"{value:.6f}")
        else:
            cells.append(str(value))
    return cells


def column_names(row: dict) -> list[str]:
    return [("time" if name == "seconds" else name) for name in row]


class ProgressCallback(Callback):
    """Show training progress; the table rows come from `learn.history` (AvgStatsCallback).

    `bars=None` decides by whether stdout is a terminal; `write` receives plain lines
    (default: print, flushed, so a log tail shows each epoch as it ends).
    """

    order = 60

    def __init__(self, bars: bool | None = None, write: Callable[[str], None] | None = None,
                 beta: float = 0.98):
        self.bars = bars
        self.write = write or (lambda line: print(line, flush=True))
        self.smooth = SmoothLoss(beta)
        self.mbar = self.pbar = None
        self.header_done = False
        self.images, self.train_start = 0, 0.0

    def before_fit(self, learn) -> None:
        self.use_bars = sys.stdout.isatty() if self.bars is None else self.bars
        self.header_done = False
        self.widths: list[int] = []
        self.smooth.reset()
        self.mbar = self.pbar = None
        if self.use_bars:
            from fastprogress.fastprogress import master_bar

            self.mbar = master_bar(range(learn.n_epochs))
            self.mbar.on_iter_begin()
            self.mbar.update(0)
            if learn.start_epoch:
                self.mbar.update(learn.start_epoch)

    def before_train(self, learn) -> None:
        self.images, self.train_start = 0, time.perf_counter()
        self._child_bar(learn)

    def before_validate(self, learn) -> None:
        self._child_bar(learn)

    def _child_bar(self, learn) -> None:
        if not self.use_bars:
            return
        from fastprogress.fastprogress import progress_bar

        total = learn.n_iter if learn.n_iter is not None else "noinfer"
        source = range(learn.n_iter) if learn.n_iter is not None else ()
        self.pbar = progress_bar(source, total=total, parent=self.mbar, leave=False)
        self.pbar.update(0)

    def after_loss(self, learn) -> None:
        if learn.training:
            self.smooth.add(learn.loss.item())

    def after_batch(self, learn) -> None:
        if self.pbar is not None:
            if learn.training:
                self.images += learn.yb.shape[0]
                rate = self.images / max(time.perf_counter() - self.train_start, 1e-9)
                self.pbar.comment = f"loss {self.smooth.value:.4f}, {rate:.0f} images/s"
            self.pbar.update(learn.iter + 1)

    def after_train(self, learn) -> None:
        self._close_child()

    def after_validate(self, learn) -> None:
        self._close_child()

    def _close_child(self) -> None:
        if self.pbar is not None:
            if self.pbar.last_v is not None:  # fastprogress ends a bar itself when it fills
                self.pbar.on_iter_end()
            self.pbar = None

    def after_epoch(self, learn) -> None:
        row = learn.history[-1] if learn.history else None
        if row is not None and row.get("epoch") == learn.epoch:
            names = list(row)
            if not self.header_done:
                self._line(column_names(row), table=True)
                self.header_done = True
            self._line(format_row(row, names), table=True)
        if self.mbar is not None:
            self.mbar.update(learn.epoch + 1)

    def _line(self, cells: list[str], table: bool) -> None:
        if self.mbar is not None:
            self.mbar.write(cells, table=table)
        else:
            if not self.widths:  # the header fixes the column widths
                self.widths = [max(len(c), 9) for c in cells]
            self.write("  ".join(f"{c:>{w}}" for c, w in zip(cells, self.widths, strict=True)))

    def after_fit(self, learn) -> None:
        self._close_child()
        if self.mbar is not None:
            self.mbar.on_iter_end()
            self.mbar = None
