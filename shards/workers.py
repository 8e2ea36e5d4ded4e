"""Write planned shards in parallel: one worker process per shard at a time.

Each task is one shard decided by `shards.shard_plan`; its worker reads, fully decodes
(`shards.images`) and writes every usable file with `ShardWriter`, under a temporary name
renamed when complete. A worker holds one image at a time, so memory stays flat however
large SRC is, and since every shard's contents were fixed by the plan, the shards are the
same, byte for byte, for any number of processes. Workers whose sharder has been killed
(kill -9) notice, drop their shard in progress and exit.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.format import encode_info, sample_key, shard_name
from shards.images import BadImage, check_file
from shards.shard_plan import ShardError, ShardTask
from shards.writer import ShardInfo, ShardWriter

IN_FLIGHT_PER_PROCESS = 2  # shard tasks submitted per process: the next one is always ready
WATCH_SECONDS = 1.0  # how often an idle worker checks that the sharder is still there


@dataclass
class ShardResult:
    """What a worker did with one `ShardTask`."""

    split: str
    index: int
    shard: ShardInfo | None = None  # None: no usable image in the task
    skipped: list[dict] = field(default_factory=list)
    failure: str | None = None  # with --on-error fail: the file and the reason
    # RGB pixel counts (R 0-255, G, B) of the training images sampled for mean/std
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(768, dtype=np.int64))
    stats_images: int = 0  # how many images the histogram counts
    formats: Counter = field(default_factory=Counter)
    reencoded: int = 0


def write_shard(
    out: Path, task: ShardTask, *, src: Path, max_pixels: int | None, max_size: int | None,
    stop_at_error: bool, parent_pid: int | None = None,
) -> ShardResult:  # fmt: skip
    """Check every file of `task` (full decode) and write the usable ones as one shard.

    The shard is written under a temporary name and renamed when complete (`ShardWriter`).
    With `stop_at_error` the first unusable file ends the task and no shard is left. A worker
    whose sharder has been killed (`parent_pid` gone) drops its shard and exits.
    """
    result = ShardResult(task.split, task.index)
    writer = ShardWriter(out, task.split, sys.maxsize, start_index=task.index,
                         sync=False)  # `write_shards` fsyncs it, in the background
    try:
        _write_jobs(writer, task, result, src=src, max_pixels=max_pixels, max_size=max_size,
                    stop_at_error=stop_at_error, parent_pid=parent_pid)
        writer.close()
    except OSError as e:  # writing (reading a source file is a BadImage): a full disk, ...
        path, written = writer.in_progress
        writer.abort()
        raise ShardWriteError(
            f"{path or out}: cannot write ({e.strerror or e}) after {written:,} bytes of "
            f"{shard_name(task.split, task.index)}") from None
    except BaseException:
        writer.abort()
        raise
    result.shard = writer.shards[0] if writer.shards else None
    return result


class ShardWriteError(ShardError):
    """Writing a shard failed (a full disk, a lost mount); the message names the file."""


def _write_jobs(
    writer: ShardWriter, task: ShardTask, result: ShardResult, *, src: Path,
    max_pixels: int | None, max_size: int | None, stop_at_error: bool, parent_pid: int | None,
) -> None:  # fmt: skip
    for job in task.jobs:
        if parent_pid is not None and not _alive(parent_pid):
            writer.abort()  # drop the temporary file, then stop this orphaned worker
            os._exit(1)
        try:
            path = os.path.join(src, job.rel)
            image = check_file(path, max_pixels=max_pixels, max_size=max_size,
                               want_histogram=result.stats_images < task.stats_images)
        except BadImage as e:
            if stop_at_error:
                result.failure = f"{path}: {e}"
                writer.abort()
                break
            result.skipped.append({"path": job.rel, "reason": str(e)})
            continue
        writer.write(sample_key(job.rel), image.ext, image.data, job.label_index,
                     encode_info(job.rel, job.label))
        result.formats[image.ext] += 1
        result.reencoded += image.reencoded
        if image.histogram is not None:
            result.histogram += image.histogram
            result.stats_images += 1


def worker_context() -> multiprocessing.context.BaseContext:
    """How to start workers: fork when this process runs one thread, else forkserver.

    fork starts a worker in milliseconds with everything already imported, but is unsafe
    when other threads may hold locks (a caller running Ray, a notebook); forkserver starts
    workers from a clean single-threaded server that imports this module once (~0.5 s).
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["shards.workers"])
        return context
    return multiprocessing.get_context("spawn")


def _watch_parent(pid: int) -> None:
    """Worker start-up: exit when the sharder is gone (kill -9), rather than idle forever."""

    def watch() -> None:
        while _alive(pid):
            time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _alive(pid: int) -> bool:
    """Whether process `pid` still exists (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_tasks(
    out: Path, tasks: list[ShardTask], processes: int, **options
) -> Iterator[ShardResult]:
    """Results of `write_shard` for every task, as they finish, from `processes` pool
    processes (1: in this one).

    At most IN_FLIGHT_PER_PROCESS tasks per process are submitted at once; each task holds
    one image at a time, so memory stays flat whatever the size of SRC.
    """
    processes = min(processes, len(tasks))
    if processes <= 1:
        for task in tasks:
            yield write_shard(out, task, **options)
        return
    pool = ProcessPoolExecutor(processes, mp_context=worker_context(),
                               initializer=_watch_parent, initargs=(os.getpid(),))
    # biggest shards first: the small last shard of each split fills in at the end
    ordered = sorted(tasks, key=lambda task: sum(job.size for job in task.jobs), reverse=True)
    try:
        running = set()
        for task in ordered:
            running.add(pool.submit(write_shard, out, task, parent_pid=os.getpid(), **options))
            if len(running) < IN_FLIGHT_PER_PROCESS * processes:
                continue
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
        for future in as_completed(running):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
