"""Mid-epoch checkpoints: what one costs, and what it saves when a run dies late in an epoch.

1. seconds per checkpoint: `StepCheckpoint` writes of a `tench fit` learner (model, optimizer,
   callback and RNG states, the stream's state; torch.save, fsync, rename), median of `--writes`.
2. seconds per training step without mid-epoch checkpoints (median step of epoch 1), and the
   share of training time one checkpoint every N steps costs: checkpoint / (N * step).
3. time lost to a kill at 90% of an epoch: a run is stopped right after the step at 90% of
   epoch 1, then resumed from `last.pt` in the same process (new streams and learner, as
   `tench fit --resume` builds them), timed from the resume's start until it has trained that
   step again. Before: checkpoints only after each epoch (`--checkpoint-every 0`); after:
   every N steps for each N of `--every`.

    .venv/bin/python bench/checkpoint_bench.py [--per-class 300] [--size 64] [--bs 64] \
        [--every 200 10] [--writes 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from shards.sample import make_sample
from shards.sharder import shard_folder
from trainer.build import (
    close_streams,
    make_learner,
    make_streams,
    run_callbacks,
    schedule_callbacks,
)
from trainer.callbacks import Callback, StepCheckpoint, load_checkpoint, resume_position
from trainer.config import FitConfig


class Stop(Exception):
    """The kill: raised right after one training step."""


class StepTimes(Callback):
    """Wall-clock time after every training step, by global step; raise Stop at `stop`."""

    order = 100

    def __init__(self, stop: int | None = None):
        self.stop, self.times = stop, {}

    def after_batch(self, learn) -> None:
        if learn.training:
            step = learn.epoch * learn.n_iter + learn.iter + 1
            self.times[step] = time.perf_counter()
            if step == self.stop:
                raise Stop


def train(config: FitConfig, times: StepTimes, resume: bool = False) -> list:
    """One run (or resume) of `config` in this process; returns its StepCheckpoints."""
    streams = make_streams(config)
    try:
        learn = make_learner(config, streams, config.out, is_main=False)
        start = (0, 0)
        if resume:
            start = resume_position(learn, load_checkpoint(Path(config.out) / "last.pt"))
        cbs = run_callbacks(config, config.out, streams.train.vocab)
        learn.add_cbs(cbs)
        with contextlib.suppress(Stop):
            learn.fit(config.epochs, cbs=[*schedule_callbacks(config), times],
                      start_epoch=start[0], start_iter=start[1])
        return [cb for cb in cbs if isinstance(cb, StepCheckpoint)]
    finally:
        close_streams(streams)


def lost_to_a_kill(config: FitConfig, stop: int) -> float:
    """Seconds from the resume's start until step `stop` is trained again."""
    train(config, StepTimes(stop))
    began = time.perf_counter()
    again = StepTimes(stop)
    train(config.replace(resume=True), again, resume=True)
    return again.times[stop] - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, help="existing shards (default: make a sample)")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--every", type=int, nargs="+", default=[200, 10])
    parser.add_argument("--writes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tench-ckpt-bench-") as tmp:
        work = Path(tmp)
        shards = args.shards
        if shards is None:
            make_sample(work / "images", per_class=args.per_class, seed=0)
            shards = work / "shards"
            shard_folder(work / "images", shards, processes=1, progress=False)
        base = FitConfig(shards=str(shards), arch=args.arch, epochs=2, batch_size=args.bs,
                         size=args.size, lr=3e-3, checkpoint_every=0)

        # 1. seconds per checkpoint: one every step for `writes` steps
        (every_step,) = train(base.replace(out=str(work / "writes"), checkpoint_every=1),
                              StepTimes(stop=args.writes + 1))
        ckpt_s = statistics.median(every_step.write_seconds)
        ckpt_mb = (work / "writes" / "last.pt").stat().st_size / 2**20

        # 2. seconds per step without mid-epoch checkpoints; 3. before: a kill at 90%
        times = StepTimes()
        train(base.replace(out=str(work / "plain")), times)
        steps = len(times.times) // base.epochs
        epoch_1 = list(times.times.values())[steps:]
        step_s = statistics.median(b - a for a, b in zip(epoch_1, epoch_1[1:], strict=False))
        stop = steps + round(0.9 * steps)  # epoch 1, at 90% of it
        lost = {0: lost_to_a_kill(base.replace(out=str(work / "kill-0")), stop)}
        for every in args.every:
            lost[every] = lost_to_a_kill(base.replace(out=str(work / f"kill-{every}"),
                                                      checkpoint_every=every), stop)
    result = {
        "steps_per_epoch": steps, "checkpoint_mb": round(ckpt_mb, 2),
        "seconds_per_checkpoint": round(ckpt_s, 4), "seconds_per_step": round(step_s, 4),
        "share_at_every": {n: f"{ckpt_s / (n * step_s):.2%}" for n in args.every},
        "kill_at_step": stop,
        "seconds_lost_to_kill": {("epoch only" if n == 0 else f"every {n}"): round(s, 1)
                                 for n, s in lost.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
