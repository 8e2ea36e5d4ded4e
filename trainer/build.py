"""The pieces of a training run, shared by the local (`trainer.fit`) and the data-parallel
(`trainer.distributed`) entry: one call per process, or per Ray Train worker.

`make_streams` (the train/valid `ShardStream`s of one rank), `make_learner` (model,
optimizer, loss and the callbacks that persist nothing), `run_callbacks` (metrics files and
last.pt, main process only) and `schedule_callbacks` (the one-cycle lr and momentum).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.plan import samples_per_rank
from pipeline.stream import ShardStream
from trainer import optim
from trainer.callbacks import (
    AvgStatsCallback,
    CheckpointCallback,
    DeviceCallback,
    FreezeBody,
    MetricsLogger,
    MixedPrecision,
    MixUp,
    NonFiniteGuard,
    NormalizeCallback,
    ParamScheduler,
    ProgressCallback,
    ProgressiveResize,
    Recorder,
    StepCheckpoint,
    TestTimeAugmentation,
)
from trainer.config import FitConfig, FitError
from trainer.learner import DataPair, Learner, trainable_params
from trainer.losses import LabelSmoothingCrossEntropy
from trainer.models import N_LAYER_GROUPS, create_model, freeze_body, layer_groups
from trainer.schedules import fine_tune, one_cycle

# sgd's starting momentum: any value > 0 selects the momentum step; the one-cycle schedule
# then sets it every batch (0.95 -> 0.85 -> 0.95).
SGD_MOMENTUM = 0.9


def seed_everything(seed: int) -> None:
    """torch, numpy and python's global RNGs (the streams and MixUp seed their own)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_streams(config: FitConfig, rank: int = 0, world_size: int = 1) -> DataPair:
    """The training (shuffled, augmented) and validation streams of one rank.

    Close them with `close_streams` when done (their Ray actors stay up until then).
    """
    def stream(split: str) -> ShardStream:
        # several data sets: training draws by `weights`, validation is every set's once
        mix = {"weights": config.weights, "epoch_size": config.epoch_size} \
            if split == "train" else {}
        return ShardStream([config.shards, *config.more_shards], split,
                           config.stream_settings(), size=config.size, rank=rank,
                           world_size=world_size, address=config.address, **mix)

    train = stream("train")
    try:
        valid = stream("valid")
    except BaseException:
        train.close()
        raise
    # A last training batch of one sample breaks BatchNorm ("Expected more than 1 value per
    # channel"): drop that one sample from training epochs rather than crash at the epoch's end.
    if samples_per_rank(train.num_samples, world_size, False) % config.batch_size == 1 \
            and len(train) > train.num_actors:
        train.drop_last = True
    return DataPair(train, valid)


def close_streams(streams: DataPair) -> None:
    for stream in streams:
        if stream is not None and hasattr(stream, "close"):
            stream.close()


def make_opt_func(config: FitConfig):
    """`(params, lr) -> optimizer` for `config.opt`; every recipe has 'lr' and 'mom' hypers."""
    recipe = getattr(optim, config.opt)
    if config.opt == "sgd":
        return functools.partial(recipe, mom=SGD_MOMENTUM, wd=config.wd)
    return functools.partial(recipe, wd=config.wd)


def make_loss(config: FitConfig):
    if config.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(config.label_smoothing)
    return F.cross_entropy


def make_learner(config: FitConfig, streams: DataPair, run_dir: str | Path | None = None,
                 is_main: bool = True) -> Learner:
    """A seeded model and a Learner with the callbacks that persist nothing.

    Device placement, uint8 -> normalised float on the device, MixUp, mixed precision
    (CUDA only), loss/accuracy averages, the NaN guard, progressive resizing (`size_start`)
    and TTA after the last epoch (`tta`) on every worker; the progress
    bars and the Recorder (plots into `run_dir`) only where `is_main`. Add `run_callbacks`
    before fitting for the metrics files and last.pt; pass `schedule_callbacks` to `fit`.
    """
    vocab = streams.train.vocab
    seed_everything(config.seed)
    model = create_model(config.arch, len(vocab))
    if config.freeze_epochs:  # fine-tuning: start frozen, one param group per layer group
        freeze_body(model)
    cbs: list = [DeviceCallback(config.device), NormalizeCallback.from_stats(streams.train.stats),
                 MixedPrecision(torch.bfloat16), AvgStatsCallback(), NonFiniteGuard()]
    if config.mixup > 0:
        cbs.append(MixUp(config.mixup, seed=config.seed))
    if config.size_start is not None:  # every rank: each resizes its own training stream
        cbs.append(ProgressiveResize(config.size_start, config.size))
    if config.tta:
        cbs.append(TestTimeAugmentation())
    if is_main:
        cbs += [ProgressCallback(), Recorder(plot_dir=run_dir)]
    return Learner(model, streams, make_loss(config), make_opt_func(config),
                   lr=config.lr or 1e-3, cbs=cbs,
                   splitter=layer_groups if config.freeze_epochs else trainable_params)


def run_callbacks(config: FitConfig, run_dir: str | Path, vocab: Any) -> list:
    """The metrics files and last.pt after every epoch, and every `checkpoint_every` steps
    or `checkpoint_minutes` (the main process only)."""
    cbs = [MetricsLogger(run_dir), CheckpointCallback(run_dir, config.to_dict(), vocab)]
    if config.checkpoint_every or config.checkpoint_minutes:
        cbs.append(StepCheckpoint(run_dir, config.to_dict(), vocab, config.checkpoint_every,
                                  config.checkpoint_minutes))
    return cbs


def schedule_callbacks(config: FitConfig) -> list:
    """One-cycle lr and momentum as a function of the training position; with freeze_epochs,
    fastai's fine_tune: a one-cycle of the head, then one of everything (see `fine_tune`)."""
    if config.lr is None:
        raise FitError("no learning rate: give --lr or --lr-find")
    if config.freeze_epochs:
        scheds = fine_tune(config.lr, config.freeze_epochs / config.epochs, N_LAYER_GROUPS,
                           pct_start=config.pct_start)
        return [ParamScheduler(scheds), FreezeBody(config.freeze_epochs)]
    return [ParamScheduler(one_cycle(config.lr, pct_start=config.pct_start))]


def first_float_batch(learn: Learner) -> torch.Tensor:
    """One normalised training batch on the model's device (for LSUV), normalised by the
    learner's own `NormalizeCallback`."""
    stream = learn.data.train
    stream.set_epoch(0)
    batch = next(iter(stream))
    normalize = learn.find_cb(NormalizeCallback).normalize
    device = learn.find_cb(DeviceCallback).device
    learn.model.to(device)
    return normalize(batch.images.to(device))
