"""Write a labelled data set as webdataset tar shards + meta.json: the engine of `tench shard`.

`shard_data(data, out)` (what `LabeledData.to_shards` calls) runs, in order:
1. plan (`shards.shard_plan`): take the files of each split with their labels, shuffle
   them with the seed so every shard mixes classes, and decide which files go in which
   shard. Nothing is read yet.
2. check and write (`shards.workers`): sharder processes each take one planned shard at a
   time, fully decode every file of it and write the usable ones; this process fsyncs the
   finished shards in a background thread.
3. `meta.json` is written last, atomically. A folder without it is an unfinished run.

An error (or Ctrl-C) removes every shard of the run; a kill -9 can leave finished shards
and hidden `.<name>.<pid>.partial` files (the processes notice their sharder is gone and
drop theirs), but never `meta.json`, and `force` clears all of them before the next run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shards.atomic import TMP_SUFFIX
from shards.bucket import OWN_FILE, BucketOut
from shards.format import META_NAME, SPLITS, TRAIN, VALID, shard_name
from shards.images import pixel_limit
from shards.meta import build_meta, human_bytes, summary_lines, write_meta
from shards.remote import is_url
from shards.shard_plan import (
    STATS_IMAGES,
    Labelled,
    ShardError,
    ShardTask,
    assign_shards,
    plan,
    shard_bytes,
    spread_stats_sample,
)
from shards.workers import ShardResult, ShardWriteError, run_tasks

ON_ERROR = ("skip", "fail")


def default_processes() -> int:
    """The cores this process may use (respects CPU affinity and container limits)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_out(out: Path, src: Path, force: bool) -> None:
    """Refuse an OUT that is inside SRC, a file, or (without `force`) not empty; reads only."""
    if out.resolve() == src.resolve() or out.resolve().is_relative_to(src.resolve()):
        raise ShardError(f"{out}: OUT is inside SRC {src}; pick an OUT outside it")
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: OUT exists and is a file, not a folder; pick another OUT")
    existing = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if existing and not force:
        raise ShardError(
            f"{out}: OUT is not empty ({len(existing)} entries, e.g. {existing[0]!r}); pass "
            "--force to replace an earlier run's shards and meta.json, or pick an empty folder"
        )


def prepare_out(out: Path, src: Path, force: bool) -> None:
    """Refuse an unusable OUT before any work; with `force`, clear an earlier run's files.

    Only tench's own names are removed (`meta.json` first, then `<split>-NNNNNN.tar` and
    hidden `.partial` temp files); anything else in OUT is left alone.
    """
    check_out(out, src, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass  # proves we may create files there (a read-only disk, missing permission)
    except OSError as e:
        raise ShardError(f"{out}: cannot write to OUT ({e.strerror or e})") from None
    if force:
        existing = sorted(p.name for p in out.iterdir())
        (out / META_NAME).unlink(missing_ok=True)  # first: the folder stops looking complete
        for name in existing:
            if OWN_FILE.match(name) or (name.startswith(".") and name.endswith(TMP_SUFFIX)):
                (out / name).unlink(missing_ok=True)


class _Syncer:
    """fsync finished shards in a background thread, so the disk works while processes decode.

    `wait` returns when every shard and the folder itself are on disk: only then may
    `meta.json` say the run is complete.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tench-fsync")
        self.pending: list = []

    def add(self, name: str) -> None:
        self.pending.append(self.pool.submit(fsync_path, self.folder / name))

    def wait(self) -> None:
        try:
            for future in self.pending:
                future.result()
            fsync_path(self.folder)  # the renames
        finally:
            self.stop()

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders: where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Progress:
    """A fastprogress bar on a terminal, a plain line every ~10% elsewhere, or nothing."""

    def __init__(self, total: int, show: bool):
        self.total, self.show, self.start = total, show, time.perf_counter()
        self.done, self.next_line, self.bar = 0, 0, None
        if show and sys.stdout.isatty():
            from fastprogress.fastprogress import progress_bar

            self.bar = progress_bar(range(total))
            self.bar.update(0)

    def add(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.done)
        elif self.show and (self.done >= self.next_line or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(f"checked {self.done:,}/{self.total:,} files ({rate:,.0f}/s)", flush=True)
            self.next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            print(flush=True)  # the bar leaves the cursor at the end of its line


def write_shards(
    src: Path, out: Path, tasks: list[ShardTask], *, processes: int, max_pixels: int | None,
    max_size: int | None, on_error: str, progress: bool, upload: Callable | None = None,
) -> list[ShardResult]:  # fmt: skip
    """Run every task; the results in shard order. On any error no shard of the plan is left.

    `upload(path)`: called with each finished shard (which it may move away) instead of
    syncing it to disk."""
    bar = _Progress(sum(len(t.jobs) for t in tasks), progress)
    sizes = {(t.split, t.index): len(t.jobs) for t in tasks}
    results: list[ShardResult] = []
    syncer = _Syncer(out)
    try:
        for result in run_tasks(out, tasks, processes, src=src, max_pixels=max_pixels,
                                max_size=max_size, stop_at_error=on_error == "fail"):
            if result.failure:
                raise ShardError(f"{result.failure} (--on-error fail)")
            if result.shard is not None and upload is not None:
                upload(out / result.shard.name)
            elif result.shard is not None:
                syncer.add(result.shard.name)
            results.append(result)
            bar.add(sizes[(result.split, result.index)])
        bar.close()
        syncer.wait()
    except BaseException as e:
        syncer.stop()
        for task in tasks:  # the pool has stopped: no process can still be writing
            (out / shard_name(task.split, task.index)).unlink(missing_ok=True)
        if isinstance(e, (ShardWriteError, OSError)):  # a full disk: say what is left
            finished = [r.shard for r in results if r.shard]
            done = sum(shard.bytes for shard in finished)
            what = str(e) if isinstance(e, ShardError) else f"{out}: {e.strerror or e}"
            raise ShardError(
                f"{what}; removed the {len(finished)} shards finished before it "
                f"({human_bytes(done)}) and the temporary files: nothing in OUT looks "
                f"complete (no {META_NAME}); free space and re-run with --force") from e
        raise
    return sorted(results, key=lambda r: (SPLITS.index(r.split), r.index))


def shard_data(
    data: Labelled, out: str | Path, *, seed: int = 0, shard_size: int | None = None,
    max_count: int | None = None, max_size: int | None = None, processes: int | None = None,
    on_error: str = "skip", force: bool = False, progress: bool = True,
    max_pixels: int | None = None, stats_images: int = STATS_IMAGES, layout: str | None = None,
    options: dict[str, Any] | None = None,
) -> dict:  # fmt: skip
    """Shard `data` (a `shards.items.LabeledData`) into `out`; return the `meta.json` written.

    `out`: a folder, or an object-storage URL such as `s3://bucket/prefix`
    (`shards.bucket`: each shard uploaded once complete, `meta.json` last).

    `seed`: the shuffle within each split. `processes`: sharder processes (default: every
    core). `max_pixels`: refuse images with more pixels (default: Pillow's
    decompression-bomb limit). `stats_images`: training images sampled for the mean/std
    (all when there are fewer). `progress`: show a progress bar and print the summary.
    `layout` and `options` (how the files were found, split and labelled) go to meta.json
    as they are. Raises `ShardError` (a clear message) for anything that stops the run.
    """
    settings = {"seed": seed, "shard_size": shard_size, "max_count": max_count,
                "max_size": max_size, "processes": processes, "on_error": on_error,
                "progress": progress, "max_pixels": max_pixels, "stats_images": stats_images,
                "layout": layout, "options": options}
    if not is_url(out):
        meta = _shard_to_folder(data, Path(out), force=force, **settings)
        where = Path(out) / META_NAME
    else:
        bucket = BucketOut(str(out))
        bucket.prepare(force)
        try:
            with tempfile.TemporaryDirectory(prefix="tench-shard-") as staging:
                meta = _shard_to_folder(data, Path(staging), force=False, upload=bucket.upload,
                                        **settings)
                bucket.finish(Path(staging) / META_NAME)
        except BaseException:
            bucket.abort()
            raise
        where = f"{bucket.url}/{META_NAME}"
    if progress:
        print(f"wrote {where}")
    return meta


def _shard_to_folder(
    data: Labelled, out: Path, *, seed: int, shard_size: int | None, max_count: int | None,
    max_size: int | None, processes: int | None, on_error: str, force: bool, progress: bool,
    max_pixels: int | None, stats_images: int, layout: str | None,
    options: dict[str, Any] | None, upload: Callable | None = None,
) -> dict:  # fmt: skip
    """`shard_data` into a local folder; `upload` takes each finished shard (`write_shards`)."""
    src = Path(data.path)
    check_options(shard_size=shard_size, max_count=max_count, max_size=max_size,
                  processes=processes, on_error=on_error, max_pixels=max_pixels)  # fmt: skip
    processes = default_processes() if processes is None else processes
    start = time.perf_counter()
    made_out = not out.exists()
    prepare_out(out, src, force)
    try:
        plan_ = plan(data, seed)
        tasks = [
            task for split in SPLITS for task in assign_shards(
                split, plan_.jobs[split], shard_bytes(plan_.jobs[split], shard_size, processes),
                max_count)
        ]  # fmt: skip
        spread_stats_sample(tasks, stats_images)
        results = write_shards(src, out, tasks, processes=processes, max_pixels=max_pixels,
                               max_size=max_size, on_error=on_error, progress=progress,
                               upload=upload)
        shards = {split: [r.shard for r in results if r.split == split and r.shard]
                  for split in SPLITS}
        skipped = [entry for r in results for entry in r.skipped]
        if not shards[TRAIN]:
            for info in shards[VALID]:
                (out / info.name).unlink(missing_ok=True)
            raise ShardError(
                f"{src}: none of the {len(plan_.jobs[TRAIN])} training files is a usable "
                f"image, e.g. {skipped[0]['path']}: {skipped[0]['reason']}"
            )
    except BaseException:
        if made_out:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if this run made it and left it empty
        raise
    histogram = sum(r.histogram for r in results)
    formats = sum((r.formats for r in results), Counter())
    meta = build_meta(
        plan_.vocab, shards, histogram, sum(r.stats_images for r in results),
        plan_.skipped + skipped,
        layout=layout, source=str(src.resolve()),
        options={**(options or {}), "seed": seed, "shard_size": shard_size,
                 "max_count": max_count, "max_size": max_size,
                 "max_pixels": pixel_limit(max_pixels)},
        reencoded=sum(r.reencoded for r in results), formats=dict(sorted(formats.items())),
    )  # fmt: skip
    try:
        write_meta(out, meta)
    except OSError as e:  # the temporary meta.json is gone; the shards are useless without it
        for info in (info for infos in shards.values() for info in infos):
            (out / info.name).unlink(missing_ok=True)
        raise ShardError(f"{out / META_NAME}: cannot write ({e.strerror or e}); removed the "
                         "shards of this run, nothing in OUT looks complete; free space and "
                         "re-run with --force") from e
    if progress:
        for line in summary_lines(meta, time.perf_counter() - start):
            print(line)
    return meta


def check_options(**values: Any) -> None:
    """Refuse a count below 1 or an unknown `on_error`, naming the `tench shard` flag."""
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if name == "on_error":
            if value not in ON_ERROR:
                raise ShardError(f"{flag} must be one of {ON_ERROR}, got {value!r}")
        elif value is not None and value < 1:
            raise ShardError(f"{flag} must be at least 1, got {value}")
