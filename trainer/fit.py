"""`tench fit SHARDS --out RUN_DIR`: train a model on shards streamed through Ray.

`run_fit(config)` trains in this one process; with `--num-workers`/`--workers-per-node`
the command hands over to `trainer.distributed` (data-parallel on Ray Train). Both build
their runs from `trainer.build` and write the run folder through `trainer.run_dir`:
`config.json`, `metrics.json`/`.csv`, `last.pt` (every epoch, atomic), `loss.png`,
`schedule.png` (and `lr_find.png` with --lr-find) and, at the end, `model.pt` for
`tench predict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from pathlib import Path

from pipeline.ray_setup import RayJoinError
from pipeline.source import ShardReadError, ShardSource
from trainer.build import (
    close_streams,
    first_float_batch,
    make_learner,
    make_streams,
    run_callbacks,
    schedule_callbacks,
)
from trainer.callbacks import (
    CheckpointError,
    NonFiniteLossError,
    load_checkpoint,
    lr_find,
    resume_position,
)
from trainer.callbacks.resize import parse_size
from trainer.config import OPTIMIZERS, RUNTIME_FIELDS, FitConfig, FitError
from trainer.distributed import add_cluster_arguments, main_distributed
from trainer.lsuv import lsuv_init
from trainer.models import ARCHS
from trainer.run_dir import (
    LAST_NAME,
    LR_FIND_PLOT_NAME,
    prepare_run_dir,
    read_config,
    run_summary,
    save_model,
    summary_line,
    write_config,
)
from trainer.transfer import load_init, read_init_source, source_arch


# ----------------------------------------------------------------------------- the run
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
    runtime = {name: getattr(config, name) for name in RUNTIME_FIELDS}
    return ckpt, stored.replace(**{**runtime, "resume": True, "shards": config.shards,
                                   "out": config.out})


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
        if config.actors is None:  # record the resolved count: it fixes the batch order
            config = config.replace(actors=streams.train.num_actors)
        learn = make_learner(config, streams, run_dir)
        start_epoch = start_iter = 0
        if ckpt is not None:
            start_epoch, start_iter = resume_position(learn, ckpt)
            if start_iter:
                print(f"resuming epoch {start_epoch} at training batch {start_iter} of "
                      f"{len(streams.train)}", flush=True)
        else:
            if config.init:
                report = load_init(learn.model, read_init_source(config.init), vocab, config.arch)
                print("\n".join(report.lines()), flush=True)
            if config.lsuv and not config.init:  # never re-initialise loaded weights
                lsuv_init(learn.model, first_float_batch(learn))
            if config.lr_find:
                plot = run_dir / LR_FIND_PLOT_NAME
                result = lr_find(learn, plot_path=plot)
                config = config.replace(lr=result.suggestion)
                print(f"lr finder: suggested lr {result.suggestion:.3g} (plot: {plot})",
                      flush=True)
        write_config(run_dir, config)
        learn.add_cbs(run_callbacks(config, run_dir, vocab))
        learn.fit(config.epochs, cbs=schedule_callbacks(config), start_epoch=start_epoch,
                  start_iter=start_iter)
        model_path = save_model(run_dir, learn.model, config, vocab, stats)
    finally:
        close_streams(streams)
    return run_summary(run_dir, model_path, config, learn.history, start_time,
                       start_epoch=start_epoch)


# ----------------------------------------------------------------------------- the CLI
class RenamedOption(argparse.Action):
    """An option of an older tench: refuse it, saying what it is called now."""

    def __init__(self, option_strings, dest, message: str, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FitConfig()
    s = argparse.SUPPRESS  # options not given stay out of the namespace (see config_from_args)
    parser.add_argument("shards", metavar="SHARDS", nargs="+",
                        help="shards folder or URL (tench shard's OUT); several: one stream "
                             "over all of them (one vocab)")
    parser.add_argument("--weights", type=float, nargs="+", default=s, metavar="W",
                        help="one per SHARDS: each training epoch draws from them in this "
                             "proportion (default: each set once)")
    parser.add_argument("--epoch-size", type=int, default=s, metavar="N",
                        help="with --weights: training samples per epoch (default: all)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for the run")
    parser.add_argument("--arch", choices=ARCHS, default=s, help=f"model (default {d.arch})")
    parser.add_argument("--epochs", type=int, default=s, help=f"default {d.epochs}")
    parser.add_argument("--batch-size", "--bs", type=int, default=s, dest="batch_size",
                        help=f"images per batch, per process (default {d.batch_size})")
    parser.add_argument("--lr", type=float, default=s,
                        help=f"peak learning rate of the one-cycle schedule (default {d.lr})")
    parser.add_argument("--lr-find", action="store_true", default=s,
                        help="pick the lr with the LR finder first (writes lr_find.png)")
    parser.add_argument("--opt", choices=OPTIMIZERS, default=s, help=f"default {d.opt}")
    parser.add_argument("--wd", type=float, default=s, help=f"weight decay (default {d.wd})")
    parser.add_argument("--pct-start", type=float, default=s,
                        help=f"warm-up share of the one-cycle schedule (default {d.pct_start})")
    parser.add_argument("--size", default=s, metavar="N|START:N",
                        help=f"image side in px (default {d.size}); START:N resizes "
                             "progressively: the first half of the epochs ramp from START to N")
    parser.add_argument("--tta", action="store_true", default=s,
                        help="after the last epoch, validate again with test-time augmentation "
                             "(centre crop + its flip): metrics.json's accuracy_tta")
    parser.add_argument("--init", default=s, metavar="SOURCE",
                        help="start from a tench run folder, model.pt or PyTorch state-dict "
                             "file (--arch defaults to a tench model's)")
    parser.add_argument("--freeze-epochs", type=int, default=s, metavar="N",
                        help="with --init: the first N of --epochs train the head only, the "
                             "rest everything with discriminative lrs (fastai's fine_tune)")
    parser.add_argument("--lsuv", action=argparse.BooleanOptionalAction, default=s,
                        help=f"LSUV initialisation of a model trained from scratch (default "
                             f"{'on' if d.lsuv else 'off'}; never applied to --init's weights)")
    parser.add_argument("--mixup", type=float, default=s, metavar="ALPHA",
                        help="MixUp with Beta(ALPHA, ALPHA) (default off)")
    parser.add_argument("--label-smoothing", type=float, default=s, metavar="EPS",
                        help="label-smoothing cross-entropy (default off)")
    parser.add_argument("--cache-dir", default=s, metavar="DIR",
                        help="remote shards (http/s3): download each once to DIR, read it there")
    parser.add_argument("--cache-limit", default=s, metavar="SIZE",
                        help=f"bound on the cache's size (default {d.cache_limit})")
    parser.add_argument("--actors", type=int, default=s, metavar="N",
                        help="Ray actors that read, decode and augment each stream "
                             f"(default {d.actors})")
    # Hidden: without it argparse would read an old `--workers 2` as `--workers-per-node 2`.
    parser.add_argument("--workers", action=RenamedOption, help=s,
                        message="--workers is now --actors (Ray actors per stream); "
                                "training processes on a cluster are --num-workers")
    parser.add_argument("--seed", type=int, default=s, help=f"default {d.seed}")
    parser.add_argument("--resume", action="store_true", default=s,
                        help="continue RUN_DIR from its last checkpoint (last.pt), mid-epoch "
                             "or not")
    parser.add_argument("--checkpoint-every", type=int, default=s, metavar="N",
                        help="also write last.pt every N training steps (0: only after each "
                             f"epoch; default {d.checkpoint_every})")
    parser.add_argument("--checkpoint-minutes", type=float, default=s, metavar="M",
                        help="also write last.pt every M minutes (default off)")
    parser.add_argument("--force", action="store_true", default=s,
                        help="start over in a non-empty RUN_DIR (replaces tench's files there)")
    parser.add_argument("--address", default=s, help="Ray cluster to join (e.g. auto)")
    parser.add_argument("--device", default=s, help="cpu, cuda, cuda:1 (default: CUDA if present)")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error, not just its sentence")
    add_cluster_arguments(parser)  # --num-workers etc. (Ray Train)


def config_from_args(args: argparse.Namespace) -> FitConfig:
    """FitConfig defaults overlaid with the options the user gave."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FitConfig)
             if hasattr(args, f.name)}
    given["shards"], given["out"] = str(args.shards[0]), str(args.out)
    given["more_shards"] = tuple(str(s) for s in args.shards[1:])
    if "size" in given:  # "64" or "48:64" (progressive): both fields, so a resume can compare
        given["size_start"], given["size"] = parse_size(given["size"])
    if given.get("lr_find") and "lr" not in given:
        given["lr"] = None
    stored = read_config(args.out) if given.get("resume") else None
    if stored is not None:  # resume: the run's settings, plus changes
        return FitConfig.from_dict({**stored.to_dict(), **given})
    if given.get("init") and "arch" not in given:
        given["arch"] = source_arch(given["init"]) or FitConfig.arch
    return FitConfig(**given)


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        if getattr(args, "num_workers", None) or getattr(args, "workers_per_node", None):
            if config.freeze_epochs:  # DDP fixes the trainable set when it wraps the model
                raise FitError("--freeze-epochs trains in one process only; leave out "
                               "--num-workers/--workers-per-node or --freeze-epochs")
            return main_distributed(config, args)  # data-parallel on Ray Train
        summary = run_fit(config)
    except NonFiniteLossError as e:
        print(f"tench fit: training diverged: {e}", file=sys.stderr)
        return 1
    except (FitError, CheckpointError, RayJoinError, ValueError, FileNotFoundError) as e:
        print(f"tench fit: {e}", file=sys.stderr)
        return 2
    except (ShardReadError, OSError) as e:  # damaged or unreachable data found mid-run
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"tench fit: {e} (last.pt keeps the last completed epoch: --resume continues "
              "from it once the data is fixed)", file=sys.stderr)
        return 1
    print(summary_line(summary))
    return 0
