"""Mid-epoch checkpoints: `last.pt` every N training steps and/or every M minutes, and the
resume from one, so a killed run loses at most the steps since the last one.

A mid-epoch checkpoint is `checkpoint_state` (see `trainer.callbacks.checkpoint`), with
`epoch` still the last *completed* epoch (-1 in the first), plus

    mid_epoch   {"epoch": the epoch it stopped in, "batches": its training batches done,
                 "streams": every rank's training `ShardStream.state_dict()`, by rank}

The rest of the epoch's progress is in the callbacks' states (`AvgStatsCallback`'s partial
sums, `MixUp`'s generator), the global RNGs, the optimizer and the model, as in every
checkpoint; the schedule position follows from the epoch and batch. It is written over the
same `last.pt`, atomically, so the file on disk is always the last complete checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trainer.callbacks.checkpoint import checkpoint_state, restore, save_checkpoint
from trainer.callbacks.core import Callback
from trainer.run_dir import LAST_NAME


def mid_epoch_state(learn, streams: list[dict], config: dict | None = None,
                    vocab: Any = None) -> dict:
    """The checkpoint of `learn` after training batch `learn.iter` of epoch `learn.epoch`;
    `streams` is every rank's training stream state (one for a single process)."""
    state = checkpoint_state(learn, config, vocab)
    state["epoch"] = learn.epoch - 1
    state["mid_epoch"] = {"epoch": learn.epoch, "batches": learn.iter + 1,
                          "streams": list(streams)}
    return state


def resume_position(learn, ckpt: dict) -> tuple[int, int]:
    """`restore` `ckpt` into `learn`; for a mid-epoch one also put the training stream at
    its place. Returns `(start_epoch, start_iter)` for `learn.fit`.

    On the same layout (ranks, actors) the stream yields exactly the batches the
    interrupted run had left; on another, the samples no old rank was handed, re-planned,
    and `start_iter` is chosen so the epoch still ends at batch `len(stream) - 1`.
    """
    start_epoch = restore(learn, ckpt)
    mid = ckpt.get("mid_epoch")
    if mid is None:
        return start_epoch, 0
    stream = learn.data.train
    stream.load_state_dict(mid["streams"])
    return stream.epoch, len(stream) - stream.batches_left()


class StepCheckpoint(Callback):
    """Write `folder/last.pt` after every `every`-th training step of the run (counted from
    the run's start, so a resumed run checkpoints where the uninterrupted one did) and/or
    when `minutes` have passed since the last checkpoint (the epoch's included).

    Never after an epoch's last training batch: `CheckpointCallback` writes the finished
    epoch a moment later. `write_seconds` keeps how long each write took.
    """

    order = 75  # after every other after_batch handler: the batch is fully accounted for

    def __init__(self, folder: str | Path, config: dict | None = None, vocab: Any = None,
                 every: int | None = None, minutes: float | None = None, name: str = LAST_NAME):
        if every is not None and every < 0:
            raise ValueError(f"checkpoint every N steps needs N >= 0 (0: off), got {every}")
        if minutes is not None and not minutes > 0:
            raise ValueError(f"checkpoint every M minutes needs M > 0, got {minutes}")
        self.path = Path(folder) / name
        self.config, self.vocab = config, vocab
        self.every, self.minutes = every, minutes
        self.last_write = time.monotonic()
        self.write_seconds: list[float] = []

    def before_fit(self, learn) -> None:
        self.last_write = time.monotonic()

    def after_batch(self, learn) -> None:
        if learn.training and self.due(learn):
            self.write(learn)

    def after_epoch(self, learn) -> None:
        self.last_write = time.monotonic()  # CheckpointCallback has just written the epoch

    def due(self, learn) -> bool:
        if learn.n_iter is None or learn.iter + 1 >= learn.n_iter:
            return False
        step = learn.epoch * learn.n_iter + learn.iter + 1
        by_steps = bool(self.every) and step % self.every == 0
        by_time = self.minutes is not None and \
            time.monotonic() - self.last_write >= self.minutes * 60
        return by_steps or by_time

    def stream_states(self, learn) -> list[dict]:
        """Every rank's training stream state; here, the one process's."""
        return [learn.data.train.state_dict()]

    def write(self, learn) -> None:
        began = time.perf_counter()
        self.save(learn)
        self.write_seconds.append(time.perf_counter() - began)
        self.last_write = time.monotonic()

    def save(self, learn) -> None:
        state = mid_epoch_state(learn, self.stream_states(learn), self.config, self.vocab)
        save_checkpoint(self.path, state)
