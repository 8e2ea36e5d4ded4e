"""A `tench fit` that SIGKILLs itself at a chosen moment (tests/test_midepoch_resume.py).

    python -m tests.midepoch_child KILL -- FIT_ARGS...

KILL is `none`, `step:K` (right after training step K of the run, its checkpoint included)
or `write:K` (halfway through writing the K-th mid-epoch checkpoint: a real partial file
is on disk when the process dies). Everything else is the real `tench fit`.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

from shards.atomic import atomic_open
from trainer import cli, fit
from trainer.callbacks import Callback, step_checkpoint


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(Callback):
    order = 100  # after StepCheckpoint (75): the step's checkpoint, if any, is written

    def __init__(self, step: int):
        self.step = step

    def after_batch(self, learn) -> None:
        if learn.training and learn.epoch * learn.n_iter + learn.iter + 1 == self.step:
            die()


def kill_during_write(nth: int):
    count = 0

    def save(path, state):
        nonlocal count
        count += 1
        if count < nth:
            return real_save(path, state)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        with atomic_open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

    real_save = step_checkpoint.save_checkpoint
    return save


def main(argv: list[str]) -> int:
    kill, rest = argv[0], argv[argv.index("--") + 1:]
    kind, _, number = kill.partition(":")
    if kind == "step":
        real_callbacks = fit.run_callbacks
        fit.run_callbacks = lambda *a: [*real_callbacks(*a), KillAfterStep(int(number))]
    elif kind == "write":
        step_checkpoint.save_checkpoint = kill_during_write(int(number))
    elif kind != "none":
        raise SystemExit(f"unknown kill {kill!r}")
    return cli.main(["fit", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
