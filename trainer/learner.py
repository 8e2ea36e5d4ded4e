"""The Learner: the training loop and nothing else.

Each stage of the loop is one line followed by one event. Everything else (device
placement, normalisation, mixed precision, statistics, schedules, progress bars,
checkpoints) is a callback in `trainer.callbacks`. Callbacks receive the learner as the
argument of every event method and read or replace the few attributes the loop exposes:

    model, opt, data, loss_func, lr      what is trained, and how
    xb, yb, pred, loss, loss_grad, batch the current batch (loss_grad is what backward() runs on)
    epoch, n_epochs, start_epoch         epoch index, epochs planned for this fit, where it began
    start_iter                           batches of epoch `start_epoch` done before this fit
    iter, n_iter                         batch index in the current pass, len(stream) or None
    training                             True in the training pass, False in validation
    pct_train                            position in [0, 1] over the whole fit (for schedules)
    history                              one dict of metrics per finished epoch
    data_wait                            seconds the current pass has waited for its batches

The course's defects are fixed: `before_epoch` fires once per epoch, and a callback that
returns a value is an error (control flow is only the Cancel exceptions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from trainer.callbacks.core import (
    EVENTS,
    Callback,
    CallbackError,
    CancelBatch,
    CancelEpoch,
    CancelFit,
    CancelStep,
    CancelTrain,
    CancelValidate,
    event_handlers,
    returned_value_error,
)


class DataPair(NamedTuple):
    """A training and a validation stream: anything iterable of `pipeline.batch.Batch`.

    `valid` may be None (no validation). A stream with `len()` lets the progress bar and
    schedules know the epoch length; one with `set_epoch(e)` is reseeded every epoch.
    """

    train: Iterable
    valid: Iterable | None


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """The default splitter: one parameter group of everything that requires a gradient."""
    return [p for p in model.parameters() if p.requires_grad]


def stream_length(stream: Iterable) -> int | None:
    """Batches per pass when the stream knows it (lists, ShardStream), else None."""
    return len(stream) if hasattr(stream, "__len__") else None


class Learner:
    """Model + data + loss + optimizer factory, driven by `fit` and extended by callbacks."""

    def __init__(
        self,
        model: nn.Module,
        data: DataPair | tuple[Iterable, Iterable | None],
        loss_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        opt_func: Callable[..., Any],
        lr: float = 1e-2,
        cbs: Iterable[Callback] = (),
        splitter: Callable[[nn.Module], Any] = trainable_params,
    ) -> None:
        self.model = model
        self.data = DataPair(*data)
        self.loss_func = loss_func
        self.opt_func = opt_func
        self.lr = lr
        self.splitter = splitter  # model -> params or param groups for opt_func
        self.opt = None  # created by the first fit (or create_opt)
        self.cbs: list = []
        self._handlers: dict[str, tuple] = {event: () for event in EVENTS}
        self.history: list[dict] = []
        self.epoch = self.n_epochs = self.start_epoch = self.start_iter = self.iter = 0
        self.n_iter: int | None = None
        self.training = False
        self.pct_train = 0.0
        self.data_wait = 0.0
        self.batch = self.xb = self.yb = self.pred = self.loss = self.loss_grad = None
        self.add_cbs(cbs)

    # --- callbacks -------------------------------------------------------------------
    def add_cbs(self, cbs: Iterable[Callback]) -> list:
        """Register callbacks (checked against `EVENTS`); returns the ones added."""
        added = list(cbs)
        for cb in added:
            if any(cb is other for other in self.cbs):
                raise CallbackError(f"{cb!r} is already registered with this learner")
            event_handlers(cb)  # validate now, so a bad callback fails at registration
        self.cbs.extend(added)
        self._rebuild_handlers()
        return added

    def remove_cbs(self, cbs: Iterable[Callback]) -> None:
        for cb in cbs:
            self.cbs = [other for other in self.cbs if other is not cb]
        self._rebuild_handlers()

    def find_cb(self, cls: type) -> Any:
        """The first registered callback of type `cls`, or None."""
        return next((cb for cb in self.cbs if isinstance(cb, cls)), None)

    def _rebuild_handlers(self) -> None:
        # Precomputed per-event tuples of bound methods, so dispatch is a plain loop.
        ordered = sorted(self.cbs, key=lambda cb: getattr(cb, "order", 0))  # stable sort
        per_cb = [event_handlers(cb) for cb in ordered]
        self._handlers = {
            event: tuple(h[event] for h in per_cb if event in h) for event in EVENTS
        }

    def __call__(self, event: str) -> None:
        for handler in self._handlers[event]:
            result = handler(self)
            if result is not None:
                raise returned_value_error(handler, result)

    @property
    def mid_epoch_resume(self) -> bool:
        """True during epoch `start_epoch` of a fit that resumed it at batch `start_iter` > 0
        (callbacks with per-epoch state restore it then, instead of starting afresh)."""
        return bool(self.start_iter) and self.epoch == self.start_epoch

    # --- the loop --------------------------------------------------------------------
    def create_opt(self) -> Any:
        self.opt = self.opt_func(self.splitter(self.model), lr=self.lr)
        return self.opt

    def fit(self, n_epochs: int, cbs: Iterable[Callback] = (), start_epoch: int = 0,
            start_iter: int = 0) -> None:
        """Train for epochs `start_epoch .. n_epochs-1`; `cbs` are attached for this fit only.

        `start_epoch` resumes a run: schedules see the same `pct_train` as in an
        uninterrupted run of `n_epochs`. `start_iter` resumes mid-epoch: the training
        stream already yields only the rest of epoch `start_epoch` (its `load_state_dict`),
        whose first batch is then batch `start_iter`.
        """
        if n_epochs < 1 or not 0 <= start_epoch <= n_epochs or start_iter < 0:
            raise ValueError(
                f"fit needs n_epochs >= 1, 0 <= start_epoch <= n_epochs and start_iter >= 0, "
                f"got n_epochs={n_epochs}, start_epoch={start_epoch}, start_iter={start_iter}"
            )
        added = self.add_cbs(cbs)
        try:
            if self.opt is None:
                self.create_opt()
            self.n_epochs, self.start_epoch, self.start_iter = n_epochs, start_epoch, start_iter
            self.epoch, self.pct_train = start_epoch, start_epoch / n_epochs
            try:
                self("before_fit")
                for self.epoch in range(start_epoch, n_epochs):
                    self._one_epoch()
            except CancelFit:
                self("after_cancel_fit")
            self("after_fit")
        finally:
            self.remove_cbs(added)

    def _one_epoch(self) -> None:
        try:
            self("before_epoch")
            self._train()
            self._validate()
        except CancelEpoch:
            self("after_cancel_epoch")
        self("after_epoch")

    def _train(self) -> None:
        self.training = True
        self.model.train()
        stream = self.data.train
        set_epoch = getattr(stream, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch)  # the stream's order depends only on (seed, epoch)
        self.n_iter = stream_length(stream)
        try:
            self("before_train")
            self._all_batches(stream, self.start_iter if self.mid_epoch_resume else 0)
            self.pct_train = (self.epoch + 1) / self.n_epochs
        except CancelTrain:
            self("after_cancel_train")
        self("after_train")

    def _validate(self) -> None:
        if self.data.valid is None:
            return
        self.training = False
        self.model.eval()
        self.n_iter = stream_length(self.data.valid)
        try:
            with torch.no_grad():
                self("before_validate")
                self._all_batches(self.data.valid)
        except CancelValidate:
            self("after_cancel_validate")
        self("after_validate")

    def _all_batches(self, stream: Iterable, first: int = 0) -> None:
        self.iter = first
        batches = self._timed(stream)
        for self.iter, batch in enumerate(batches, first):
            self._one_batch(batch)

    def _timed(self, stream: Iterable) -> Iterator:
        """The stream's batches, adding the time spent fetching each to `data_wait` (host
        clock only: no device sync)."""
        self.data_wait = 0.0
        start = time.perf_counter()
        batches = iter(stream)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                self.data_wait += time.perf_counter() - start
                return
            self.data_wait += time.perf_counter() - start
            yield batch
            start = time.perf_counter()

    def _one_batch(self, batch: Any) -> None:
        self.batch, self.xb, self.yb = batch, batch.images, batch.labels
        if self.training:
            done = self.iter / self.n_iter if self.n_iter else 0.0
            self.pct_train = (self.epoch + done) / self.n_epochs
        try:
            self("before_batch")
            self.pred = self.model(self.xb)
            self("after_pred")
            self.loss = self.loss_func(self.pred, self.yb)
            self("after_loss")
            if self.training:
                self.loss_grad = self.loss
                self("before_backward")
                self.opt.zero_grad()  # here, so a cancelled batch never leaks its gradients
                self.loss_grad.backward()
                self._step()
        except CancelBatch:
            self("after_cancel_batch")
        self("after_batch")

    def _step(self) -> None:
        try:
            self("before_step")
            self.opt.step()
            self("after_step")
        except CancelStep:
            self("after_cancel_step")
