"""Progressive resizing (`tench fit --size START:N`): each training epoch at its scheduled
side, on the same Ray actors, validation at the final side, and a resumed run on schedule.

Real shards, real Ray actors, a real model trained by real steps.
"""

from __future__ import annotations

import argparse

import pytest

from tests.shard_fixtures import make_shards
from trainer.build import close_streams, make_learner, make_streams, run_callbacks
from trainer.callbacks import Callback, CancelFit, restore
from trainer.callbacks.resize import parse_size, size_for_epoch
from trainer.config import FitConfig, FitError
from trainer.fit import add_arguments, config_from_args, resume_checkpoint
from trainer.run_dir import prepare_run_dir, write_config

EPOCHS = 6  # the ramp covers epochs 0-2: 16, 16 (21.3 rounded down to 8s), 24; then 32
SCHEDULE = [16, 16, 24, 32, 32, 32]


# ----------------------------------------------------------------------------- the schedule
def test_schedule_ramps_over_the_first_half_in_multiples_of_8():
    assert [size_for_epoch(e, EPOCHS, 16, 32) for e in range(EPOCHS)] == SCHEDULE
    assert [size_for_epoch(e, 12, 48, 64) for e in range(12)] == [48] * 3 + [56] * 3 + [64] * 6
    assert [size_for_epoch(e, 2, 48, 64) for e in range(2)] == [48, 64]
    assert size_for_epoch(0, 1, 48, 64) == 64  # one epoch: the final size
    assert [size_for_epoch(e, 4, 50, 64) for e in range(4)] == [50, 56, 64, 64]  # >= start
    assert all(size_for_epoch(e, 5, None, 64) == 64 for e in range(5))


def test_size_option_parses_and_is_checked():
    assert parse_size("64") == (None, 64) and parse_size("48:64") == (48, 64)
    with pytest.raises(ValueError, match="START:N"):
        parse_size("48-64")
    with pytest.raises(ValueError, match="size_start"):
        FitConfig(size=32, size_start=48)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["shards", "--out", "run", "--size", "48:64"])
    config = config_from_args(args)
    assert (config.size_start, config.size) == (48, 64)
    assert FitConfig.from_json(config.to_json()) == config  # config.json round trip
    plain = config_from_args(parser.parse_args(["shards", "--out", "run", "--size", "64"]))
    assert (plain.size_start, plain.size) == (None, 64)


# ----------------------------------------------------------------------------- training
class SeenSizes(Callback):
    """The side of every batch the model sees, by (epoch, training?)."""

    order = 90

    def __init__(self):
        self.sizes: dict = {}

    def after_pred(self, learn) -> None:
        key = (learn.epoch, learn.training)
        self.sizes.setdefault(key, set()).add(tuple(learn.xb.shape[2:]))

    def train_sides(self) -> dict:
        return {e: sorted(s) for (e, training), s in self.sizes.items() if training}


class StopAfter(Callback):
    """Stop the fit after epoch `last` (its checkpoint written): a run cut short."""

    order = 80

    def __init__(self, last: int):
        self.last = last

    def after_epoch(self, learn) -> None:
        if learn.epoch == self.last:
            raise CancelFit


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 24, "valid": 8},
                       image_size=(40, 36)).folder


def config_for(shards, out) -> FitConfig:
    return FitConfig(shards=str(shards), out=str(out), epochs=EPOCHS, batch_size=8, size=32,
                     size_start=16, device="cpu", seed=1, arch="cnn", lsuv=False,
                     lr=3e-3)


@pytest.mark.ray
def test_each_epoch_trains_at_its_size_on_the_same_actors(ray_local, shards, tmp_path):
    config = config_for(shards, tmp_path)
    streams = make_streams(config)
    try:
        pids = streams.train.actor_pids()
        learn = make_learner(config, streams, is_main=False)
        seen = SeenSizes()
        learn.fit(EPOCHS, cbs=[seen])
        assert streams.train.actor_pids() == pids  # no new actors for a new size
    finally:
        close_streams(streams)
    assert seen.train_sides() == {e: [(s, s)] for e, s in enumerate(SCHEDULE)}
    valid = {s for (_, training), sides in seen.sizes.items() if not training for s in sides}
    assert valid == {(32, 32)}
    assert all(row["data_wait"] > 0 for row in learn.history)  # a real stream always waits


@pytest.mark.ray
def test_a_resumed_run_keeps_the_schedule(ray_local, shards, tmp_path):
    config = config_for(shards, tmp_path / "run")
    run_dir = prepare_run_dir(config)
    write_config(run_dir, config)
    streams = make_streams(config)
    try:  # the first run stops after epoch 1 (of the ramp), as a crash would
        learn = make_learner(config, streams, is_main=False)
        learn.add_cbs(run_callbacks(config, run_dir, streams.train.vocab))
        learn.fit(EPOCHS, cbs=[StopAfter(1)])
    finally:
        close_streams(streams)

    with pytest.raises(FitError, match="size_start"):  # another schedule is refused
        resume_checkpoint(config.replace(resume=True, size_start=None))
    assert resume_checkpoint(config.replace(resume=True, tta=True))[1].tta  # a runtime field
    ckpt, resumed = resume_checkpoint(config.replace(resume=True))
    assert (resumed.size_start, resumed.size) == (16, 32)
    streams = make_streams(resumed)
    try:
        learn = make_learner(resumed, streams, is_main=False)
        start = restore(learn, ckpt)
        seen = SeenSizes()
        learn.fit(EPOCHS, cbs=[seen], start_epoch=start)
    finally:
        close_streams(streams)
    assert start == 2
    assert seen.train_sides() == {e: [(s, s)] for e, s in enumerate(SCHEDULE) if e >= 2}
