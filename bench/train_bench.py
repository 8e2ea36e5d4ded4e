"""Training loop overhead and end-to-end throughput: tench's Learner vs a bare PyTorch loop.

1. ms per training batch, same model, optimizer and batches pre-loaded in memory:
   the Learner with `tench fit`'s callbacks (device, normalise, stats, NaN guard, recorder,
   one-cycle schedule; progress bars off) vs a hand-written loop doing the same maths.
2. images/s end to end: `run_fit` (ShardStream + Learner + checkpoints) vs the bare loop
   fed by the same ShardStream, to show the stream keeps up.

    .venv/bin/python bench/train_bench.py [--shards DIR] [--per-class 100] [--size 64]
        [--batches 40] [--rounds 15] [--overhead-only]

The overhead is the median over interleaved rounds of (Learner ms / bare ms), printed with the
rounds' spread (IQR, min-max) and whether it is larger than that spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shards.sample import make_sample
from shards.sharder import shard_folder
from trainer.build import close_streams, make_learner, make_opt_func, make_streams
from trainer.callbacks import ParamScheduler, Recorder
from trainer.config import FitConfig
from trainer.fit import run_fit
from trainer.learner import DataPair
from trainer.models import create_model
from trainer.schedules import one_cycle


class InMemory(list):
    """Pre-loaded batches, with the vocab and stats `make_learner` reads from a stream."""


def bare_valid(model, batches, mean, std) -> None:
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x = batch.images.contiguous(memory_format=torch.channels_last).float()
            F.cross_entropy(model(x.sub_(mean).div_(std)), batch.labels)


def bare_epoch(model, opt, batches, mean, std, sched, pos0, n_total) -> None:
    """The same work as the Learner's training pass, written by hand."""
    model.train()
    for i, batch in enumerate(batches):
        pos = (pos0 + i) / n_total
        for group in opt.param_groups:
            group["lr"], group["mom"] = sched["lr"](pos), sched["mom"](pos)
        x = batch.images.contiguous(memory_format=torch.channels_last).float()
        x = x.sub_(mean).div_(std)
        loss = F.cross_entropy(model(x), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


def time_in_memory(config: FitConfig, streams: DataPair, n_batches: int, rounds: int) -> dict:
    """ms per batch of the Learner and the bare loop, one epoch of `n_batches` each per round.

    Both are built and warmed up once; the rounds interleave them, the one going first
    alternating, so a slow spell of a shared machine hits both. Returns the per-round figures.
    """
    batches = InMemory()
    for epoch in range(n_batches):  # as many epochs of the stream as make n_batches
        streams.train.set_epoch(epoch)
        batches += list(zip(range(n_batches - len(batches)), streams.train, strict=False))
        if len(batches) == n_batches:
            break
    batches[:] = [b for _, b in batches]
    batches.vocab, batches.stats = streams.train.vocab, streams.train.stats
    stats = streams.train.stats
    mean = torch.tensor([m * 255 for m in stats["mean"]]).view(1, 3, 1, 1)
    std = torch.tensor([s * 255 for s in stats["std"]]).view(1, 3, 1, 1)
    sched = one_cycle(config.lr)
    learn = make_learner(config, DataPair(batches, None), is_main=False)
    learn.add_cbs([Recorder()])
    torch.manual_seed(config.seed)
    model = create_model(config.arch, len(streams.train.vocab)).to(
        memory_format=torch.channels_last)
    opt = make_opt_func(config)(model.parameters(), lr=config.lr)

    def run_learner() -> None:
        learn.fit(1, cbs=[ParamScheduler(sched)])

    def run_bare() -> None:
        bare_epoch(model, opt, batches, mean, std, sched, 0, len(batches))

    runs = {"learner": run_learner, "bare": run_bare}
    for run in runs.values():  # warm-up: allocations, first-call costs
        run()
    results: dict[str, list[float]] = {"learner": [], "bare": []}
    for i in range(rounds):
        for name in (("learner", "bare") if i % 2 == 0 else ("bare", "learner")):
            start = time.perf_counter()
            runs[name]()
            results[name].append((time.perf_counter() - start) / len(batches) * 1000)
    return results


def overhead_report(results: dict[str, list[float]]) -> str:
    """The Learner's overhead as the median of the per-round ratios, with their spread."""
    ratios = sorted(a / b for a, b in zip(results["learner"], results["bare"], strict=True))
    q1, median, q3 = (float(np.percentile(ratios, q)) for q in (25, 50, 75))
    lines = [
        f"ms / batch (in memory), median of {len(ratios)} rounds: tench Learner "
        f"{np.median(results['learner']):.1f}, bare loop {np.median(results['bare']):.1f}",
        f"Learner overhead: {median - 1:+.1%} (median per-round ratio {median:.3f}; "
        f"IQR {q1:.3f}-{q3:.3f}, min-max {ratios[0]:.3f}-{ratios[-1]:.3f})",
    ]
    if q1 > 1:
        verdict = "larger than the spread: the Learner was slower in 3 of 4 rounds or more"
    elif q3 < 1:
        verdict = "negative beyond the spread: the bare loop was slower (a noisy machine?)"
    else:
        verdict = "NOT larger than the spread (the IQR straddles 1): run more rounds/batches"
    lines.append(f"  the overhead is {verdict}; ≤ 5% target "
                 + ("met" if q3 <= 1.05 else "met at the median only" if median <= 1.05
                    else "missed"))
    return "\n".join(lines)


def end_to_end(config: FitConfig, streams: DataPair, epochs: int) -> dict:
    # Per epoch: one training and one validation pass, in both loops.
    n_images = (streams.train.num_samples + streams.valid.num_samples) * epochs
    run_dir = Path(tempfile.mkdtemp(prefix="train_bench_"))
    try:
        summary = run_fit(config.replace(out=str(run_dir / "run"), epochs=epochs))
        fit_s = sum(r["seconds"] for r in json.loads(
            (run_dir / "run" / "metrics.json").read_text()))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    stats = streams.train.stats
    mean = torch.tensor([m * 255 for m in stats["mean"]]).view(1, 3, 1, 1)
    std = torch.tensor([s * 255 for s in stats["std"]]).view(1, 3, 1, 1)
    torch.manual_seed(config.seed)
    model = create_model(config.arch, len(streams.train.vocab)).to(
        memory_format=torch.channels_last)
    opt = make_opt_func(config)(model.parameters(), lr=config.lr)
    sched = one_cycle(config.lr)
    n = len(streams.train)
    start = time.perf_counter()
    for epoch in range(epochs):
        streams.train.set_epoch(epoch)
        bare_epoch(model, opt, streams.train, mean, std, sched, epoch * n, epochs * n)
        bare_valid(model, streams.valid, mean, std)
    bare_s = time.perf_counter() - start
    return {"fit_images_s": n_images / fit_s, "bare_images_s": n_images / bare_s,
            "fit_total_s": summary["seconds"], "accuracy": summary["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--batches", type=int, default=40, help="batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the in-memory overhead, not the ShardStream-fed run")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="train_bench_data_"))
    try:
        shards = args.shards
        if shards is None:
            make_sample(tmp / "images", per_class=args.per_class, seed=0)
            shard_folder(tmp / "images", tmp / "shards", processes=2, progress=False)
            shards = tmp / "shards"
        config = FitConfig(shards=str(shards), arch=args.arch, batch_size=args.batch_size,
                           size=args.size, lr=1e-2, actors=1, device="cpu")
        streams = make_streams(config)
        try:
            mem = time_in_memory(config, streams, args.batches, args.rounds)
            e2e = None if args.overhead_only else end_to_end(config, streams, args.epochs)
        finally:
            close_streams(streams)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.arch}, {args.size}px, batch size {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads, {args.batches} batches x {args.rounds} "
          f"rounds, load average {os.getloadavg()[0]:.1f}")
    print(overhead_report(mem))
    if e2e is not None:
        print(f"images/s (stream, train+valid): tench fit {e2e['fit_images_s']:.0f}, "
              f"bare loop {e2e['bare_images_s']:.0f} "
              f"(bare/tench {e2e['bare_images_s'] / e2e['fit_images_s']:.3f})")
        print(f"tench fit: {args.epochs} epochs in {e2e['fit_total_s']:.1f}s with start-up, "
              f"validation and checkpoints; accuracy {e2e['accuracy']:.1%}")


if __name__ == "__main__":
    main()
