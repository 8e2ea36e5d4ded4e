"""`tench fit SHARDS --out RUN_DIR`: train a model on shards streamed through Ray.

The run is assembled from small functions that data-parallel training (one call per
worker) reuses: `make_streams` (the train/valid `ShardStream`s of one rank),
`make_learner` (model, optimizer, loss and the callbacks that do not persist anything),
`run_callbacks` (metrics log and checkpoint, main process only) and `schedule_callbacks`
(one-cycle lr and momentum). `run_fit(config)` drives one process from start to end.

RUN_DIR receives `config.json`, `metrics.json`/`.csv`, `last.pt` (every epoch, atomic),
`loss.png`, `schedule.png` (and `lr_find.png` with --lr-find) and, at the end, `model.pt`
for `tench predict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.plan import samples_per_rank
from pipeline.ray_setup import RayJoinError
from pipeline.source import ShardSource
from pipeline.stream import ShardStream
from shards.atomic import atomic_open, atomic_write_text
from trainer import optim
from trainer.callbacks import (
    AvgStatsCallback,
    CheckpointCallback,
    CheckpointError,
    DeviceCallback,
    MetricsLogger,
    MixedPrecision,
    MixUp,
    NonFiniteGuard,
    NonFiniteLossError,
    NormalizeCallback,
    ParamScheduler,
    ProgressCallback,
    Recorder,
    load_checkpoint,
    lr_find,
    restore,
)
from trainer.callbacks.checkpoint import LAST_NAME
from trainer.config import OPTIMIZERS, FitConfig
from trainer.learner import DataPair, Learner
from trainer.losses import LabelSmoothingCrossEntropy
from trainer.lsuv import lsuv_init
from trainer.models import ARCHS, create_model
from trainer.schedules import one_cycle, sched_no

MODEL_NAME = "model.pt"
CONFIG_NAME = "config.json"
MODEL_FORMAT_VERSION = 1
# Files a run writes; --force removes only these, never anything else in RUN_DIR.
RUN_FILES = (CONFIG_NAME, "metrics.json", "metrics.csv", LAST_NAME, MODEL_NAME, "loss.png",
             "schedule.png", "lr_find.png")


class FitError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


# ----------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    """torch, numpy and python's global RNGs (the streams and MixUp seed their own)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_streams(config: FitConfig, rank: int = 0, world_size: int = 1) -> DataPair:
    """The training (shuffled, augmented) and validation streams of one rank.

    Close them with `close_streams` when done (their Ray actors stay up until then).
    """
    train = ShardStream(config.shards, "train", batch_size=config.bs, size=config.size,
                        seed=config.seed, num_actors=config.workers, rank=rank,
                        world_size=world_size, address=config.address)
    try:
        valid = ShardStream(config.shards, "valid", batch_size=config.bs, size=config.size,
                            seed=config.seed, num_actors=config.workers, rank=rank,
                            world_size=world_size, address=config.address)
    except BaseException:
        train.close()
        raise
    # A last training batch of one sample breaks BatchNorm ("Expected more than 1 value per
    # channel"): drop that one sample from training epochs rather than crash at the epoch's end.
    if samples_per_rank(train.num_samples, world_size, False) % config.bs == 1 \
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
        return functools.partial(recipe, mom=config.mom, wd=config.wd)
    return functools.partial(recipe, wd=config.wd)


def make_loss(config: FitConfig):
    if config.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(config.label_smoothing)
    return F.cross_entropy


def make_learner(config: FitConfig, streams: DataPair, run_dir: str | Path | None = None,
                 is_main: bool = True) -> Learner:
    """A seeded model and a Learner with the callbacks that persist nothing.

    Device placement, uint8 -> normalised float on the device, MixUp, mixed precision
    (CUDA only), loss/accuracy averages and the NaN guard on every worker; the progress
    bars and the Recorder (plots into `run_dir`) only where `is_main`. Add `run_callbacks`
    before fitting for metrics.json and last.pt; pass `schedule_callbacks` to `fit`.
    """
    vocab = streams.train.vocab
    seed_everything(config.seed)
    model = create_model(config.arch, len(vocab))
    cbs: list = [DeviceCallback(config.device), NormalizeCallback.from_stats(streams.train.stats),
                 MixedPrecision(torch.bfloat16), AvgStatsCallback(), NonFiniteGuard()]
    if config.mixup > 0:
        cbs.append(MixUp(config.mixup, seed=config.seed))
    if is_main:
        cbs += [ProgressCallback(), Recorder(plot_dir=run_dir)]
    return Learner(model, streams, make_loss(config), make_opt_func(config),
                   lr=config.lr or 1e-3, cbs=cbs)


def run_callbacks(config: FitConfig, run_dir: str | Path, vocab: Any) -> list:
    """metrics.json/.csv and last.pt after every epoch (the main process only)."""
    return [MetricsLogger(run_dir), CheckpointCallback(run_dir, config.to_dict(), vocab)]


def schedule_callbacks(config: FitConfig) -> list:
    """One-cycle lr and momentum (or a constant lr) as a function of the training position."""
    if config.lr is None:
        raise FitError("no learning rate: give --lr or --lr-find")
    if config.one_cycle:
        return [ParamScheduler(one_cycle(config.lr, pct_start=config.pct_start))]
    return [ParamScheduler({"lr": sched_no(config.lr)})]


def first_float_batch(learn: Learner) -> torch.Tensor:
    """One normalised training batch on the model's device (for LSUV)."""
    stream = learn.data.train
    stream.set_epoch(0)
    batch = next(iter(stream))
    norm = next(cb for cb in learn.cbs if isinstance(cb, NormalizeCallback))
    device = next(cb for cb in learn.cbs if isinstance(cb, DeviceCallback)).device
    learn.model.to(device)
    x = batch.images.to(device).float()
    return (x - norm.shift.to(device)) / norm.scale.to(device)


def model_file(learn: Learner, config: FitConfig, vocab: Any, stats: dict) -> dict:
    """What `tench predict` needs: weights-only loadable (tensors, numbers, strings)."""
    return {
        "format_version": MODEL_FORMAT_VERSION,
        "arch": config.arch,
        "n_classes": len(vocab),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in
                       learn.model.state_dict().items()},
        "vocab": list(vocab.names),
        "vocab_fingerprint": vocab.fingerprint,
        "stats": {"mean": list(stats["mean"]), "std": list(stats["std"])},
        "size": config.size,
    }


def save_model(path: str | Path, state: dict) -> Path:
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return Path(path)


# ----------------------------------------------------------------------------- the run
def prepare_run_dir(config: FitConfig) -> Path:
    """Refuse to mix two runs in one folder: non-empty needs --resume or --force."""
    run_dir = Path(config.out)
    if not config.out:
        raise FitError("no run folder: give --out RUN_DIR")
    if run_dir.exists() and not run_dir.is_dir():
        raise FitError(f"{run_dir}: exists and is not a folder")
    busy = run_dir.is_dir() and any(run_dir.iterdir())
    if config.resume:
        if not (run_dir / LAST_NAME).is_file():
            raise FitError(f"{run_dir / LAST_NAME}: no checkpoint to resume from; start the "
                           "run without --resume")
    elif busy and not config.force:
        raise FitError(f"{run_dir}: not empty (an earlier run?); pass --resume to continue "
                       "it, --force to start over there, or choose another --out")
    elif busy:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resume_checkpoint(config: FitConfig) -> tuple[dict, FitConfig]:
    """last.pt checked against the shards' vocab and the config it was trained with."""
    meta = ShardSource.of(config.shards).read_meta()
    path = Path(config.out) / LAST_NAME
    ckpt = load_checkpoint(path, meta["vocab_fingerprint"])
    stored = FitConfig.from_dict(ckpt["config"])
    wanted = config.replace(shards=stored.shards, out=stored.out)
    if config.lr_find:  # the stored lr is the one the finder picked: keep it
        wanted = wanted.replace(lr=stored.lr, lr_find=stored.lr_find)
    changed = stored.differences(wanted)
    if changed:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise FitError(f"{path}: --resume must keep the run's settings, but these differ "
                       f"({listed}); resume without them or start a new run")
    return ckpt, stored.replace(resume=True, shards=config.shards, out=config.out,
                                address=config.address, device=config.device)


def run_fit(config: FitConfig) -> dict:
    """Train as `config` says, writing into `config.out`; return a summary of the run.

    Raises `FitError`/`CheckpointError` (cannot start), `NonFiniteLossError` (diverged;
    last.pt of the last good epoch is kept).
    """
    start_time = time.perf_counter()
    run_dir = prepare_run_dir(config)
    ckpt = None
    if config.resume:
        ckpt, config = resume_checkpoint(config)
    streams = make_streams(config)
    try:
        vocab, stats = streams.train.vocab, streams.train.stats
        if config.workers is None:  # record the resolved count: it fixes the batch order
            config = config.replace(workers=streams.train.num_actors)
        learn = make_learner(config, streams, run_dir)
        start_epoch = 0
        if ckpt is not None:
            start_epoch = restore(learn, ckpt)
        else:
            if config.lsuv:
                lsuv_init(learn.model, first_float_batch(learn))
            if config.lr_find:
                result = lr_find(learn, plot_path=run_dir / "lr_find.png")
                config = config.replace(lr=result.suggestion)
                print(f"lr finder: suggested lr {result.suggestion:.3g} "
                      f"(plot: {run_dir / 'lr_find.png'})", flush=True)
        atomic_write_text(run_dir / CONFIG_NAME, config.to_json())
        learn.add_cbs(run_callbacks(config, run_dir, vocab))
        learn.fit(config.epochs, cbs=schedule_callbacks(config), start_epoch=start_epoch)
        model_path = save_model(run_dir / MODEL_NAME, model_file(learn, config, vocab, stats))
    finally:
        close_streams(streams)
    last = learn.history[-1] if learn.history else {}
    return {
        "run_dir": str(run_dir),
        "model": str(model_path),
        "epochs": config.epochs,
        "start_epoch": start_epoch,
        "lr": config.lr,
        "train_loss": last.get("train_loss"),
        "valid_loss": last.get("valid_loss"),
        "accuracy": last.get("accuracy"),
        "seconds": round(time.perf_counter() - start_time, 3),
        "config": config.to_dict(),
    }


# ----------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FitConfig()
    s = argparse.SUPPRESS  # options not given stay out of the namespace (see config_from_args)
    parser.add_argument("shards", metavar="SHARDS", help="shards folder or URL (tench shard's OUT)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for the run")
    parser.add_argument("--arch", choices=ARCHS, default=s, help=f"model (default {d.arch})")
    parser.add_argument("--epochs", type=int, default=s, help=f"default {d.epochs}")
    parser.add_argument("--bs", type=int, default=s, help=f"batch size (default {d.bs})")
    parser.add_argument("--lr", type=float, default=s,
                        help=f"peak learning rate of the one-cycle schedule (default {d.lr})")
    parser.add_argument("--lr-find", action="store_true", default=s,
                        help="pick the lr with the LR finder first (writes lr_find.png)")
    parser.add_argument("--opt", choices=OPTIMIZERS, default=s, help=f"default {d.opt}")
    parser.add_argument("--wd", type=float, default=s, help=f"weight decay (default {d.wd})")
    parser.add_argument("--pct-start", type=float, default=s,
                        help=f"warm-up share of the one-cycle schedule (default {d.pct_start})")
    parser.add_argument("--size", type=int, default=s, help=f"image side in px (default {d.size})")
    parser.add_argument("--lsuv", action="store_true", default=s, help="LSUV initialisation")
    parser.add_argument("--mixup", type=float, default=s, metavar="ALPHA",
                        help="MixUp with Beta(ALPHA, ALPHA) (default off)")
    parser.add_argument("--label-smoothing", type=float, default=s, metavar="EPS",
                        help="label-smoothing cross-entropy (default off)")
    parser.add_argument("--workers", type=int, default=s,
                        help=f"Ray actors per stream (default {d.workers})")
    parser.add_argument("--seed", type=int, default=s, help=f"default {d.seed}")
    parser.add_argument("--resume", action="store_true", default=s,
                        help="continue RUN_DIR from its last completed epoch (last.pt)")
    parser.add_argument("--force", action="store_true", default=s,
                        help="start over in a non-empty RUN_DIR (replaces tench's files there)")
    parser.add_argument("--address", default=s, help="Ray cluster to join (e.g. auto)")
    parser.add_argument("--device", default=s, help="cpu, cuda, cuda:1 (default: CUDA if present)")
    from trainer.distributed import add_cluster_arguments  # --num-workers etc. (Ray Train)

    add_cluster_arguments(parser)


def config_from_args(args: argparse.Namespace) -> FitConfig:
    """FitConfig defaults overlaid with the options the user gave."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FitConfig)
             if hasattr(args, f.name)}
    given["shards"], given["out"] = str(args.shards), str(args.out)
    if given.get("lr_find") and "lr" not in given:
        given["lr"] = None
    stored = Path(args.out) / CONFIG_NAME
    if given.get("resume") and stored.is_file():  # resume: the run's settings, plus changes
        return FitConfig.from_dict({**FitConfig.from_json(stored.read_text()).to_dict(),
                                    **given})
    return FitConfig(**given)


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        if getattr(args, "num_workers", None) or getattr(args, "workers_per_node", None):
            from trainer.distributed import main_distributed  # data-parallel on Ray Train

            return main_distributed(config, args)
        summary = run_fit(config)
    except NonFiniteLossError as e:
        print(f"tench fit: training diverged: {e}", file=sys.stderr)
        return 1
    except (FitError, CheckpointError, RayJoinError, ValueError, FileNotFoundError) as e:
        print(f"tench fit: {e}", file=sys.stderr)
        return 2
    accuracy = summary["accuracy"]
    accuracy_text = "n/a" if accuracy is None else f"{accuracy:.1%}"
    print(f"done: {summary['epochs']} epochs in {summary['seconds']:.1f}s, validation accuracy "
          f"{accuracy_text}; model in {summary['model']}")
    return 0
