"""`tench shard SRC OUT`: a folder of labelled images -> webdataset tar shards + meta.json.

The run, in order:
1. plan: list SRC (`get_files`), split (ImageNet `train/` + `val/`, or `--valid-pct`),
   label by parent folder, build the vocab from the training labels only, shuffle each
   split with the seed so every shard mixes classes. A validation label missing from the
   training vocab stops the run here, before any image is read.
2. check: worker processes read each file and fully decode it (`shards.images`); a
   window of chunks in flight keeps memory flat however large SRC is.
3. write: the parent writes the results, in plan order, one `ShardWriter` per split;
   shards appear under their final names only when complete.
4. `meta.json` is written last, atomically. A folder without it is an unfinished run.

An error (or Ctrl-C) removes the shards this run finished; a kill -9 can leave finished
shards and hidden `.<name>.<pid>.partial` files, but never `meta.json`, and
`--force` clears all of them before the next run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.atomic import TMP_SUFFIX
from shards.blocks import (
    TRAIN,
    VALID,
    CategoryProcessor,
    grandparent_splitter,
    parent_labeler,
    random_splitter,
)
from shards.files import get_files, image_extensions
from shards.format import META_NAME, SPLITS, encode_info, sample_key
from shards.images import CheckedImage, check_files, file_size, pixel_limit
from shards.meta import build_meta, summary_lines, write_meta
from shards.vocab import Vocab
from shards.writer import ShardInfo, ShardWriter, sample_size

DEFAULT_SHARD_SIZE = 256 * 1000 * 1000
MIN_SHARDS = 8  # per split, when the split has enough images: one shard per reader or more
MIN_SHARD_IMAGES = 8  # ... but no fewer images than this in a scaled-down shard
CHUNK_FILES, CHUNK_BYTES = 32, 8 * 1000 * 1000  # one task for a worker
IN_FLIGHT_PER_WORKER = 2  # chunks submitted ahead per worker: enough to keep each busy
ON_ERROR = ("skip", "fail")
NO_EXTENSION = "no image extension"
OUTSIDE = "outside the layout"
_OWN_FILE = re.compile(rf"^(({'|'.join(SPLITS)})-\d{{6}}\.tar|{re.escape(META_NAME)})$")


class ShardError(RuntimeError):
    """A sharding run that cannot go on; the message says what, where and what to do."""


@dataclass
class Job:
    """One source file to check and, if it decodes, write as one sample."""

    split: str
    rel: str  # path relative to SRC, with "/" on every system
    path: str
    label: str
    label_index: int
    size: int  # bytes on disk


@dataclass
class Plan:
    layout: str  # "imagenet" or "flat"
    vocab: Vocab
    jobs: dict[str, list[Job]]  # split -> jobs in write (shuffled) order
    skipped: list[dict]  # files left out before reading: no image extension, outside layout


def default_workers() -> int:
    """The cores this process may use (respects CPU affinity and container limits)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# --- 1. plan ---------------------------------------------------------------------------


def plan(src: Path, valid_pct: float | None = None, seed: int = 0) -> Plan:
    """Which files go to which split with which label, in which order; nothing is read."""
    check_src(src)
    layout = _layout(src, valid_pct)
    if layout == "imagenet":
        splitter = grandparent_splitter
        where = "a class folder directly under train/ or val/"
    else:
        splitter = random_splitter(valid_pct, seed, root=src)
        where = "a class folder directly under SRC"
    files = get_files(src)
    if not files:
        raise ShardError(f"{src}: SRC holds no files (hidden files are ignored)")
    found: dict[str, list[tuple[str, Path, str]]] = {TRAIN: [], VALID: []}
    skipped = []
    for path in files:
        rel = path.relative_to(src).as_posix()
        if path.suffix.lower() not in image_extensions:
            skipped.append({"path": rel, "reason": f"{NO_EXTENSION}: {path.suffix or 'none'}"})
            continue
        in_class_folder = len(rel.split("/")) == (3 if layout == "imagenet" else 2)
        split = splitter(path) if in_class_folder else None
        if split is None:
            skipped.append({"path": rel, "reason": f"{OUTSIDE}: not in {where}"})
            continue
        found[split].append((rel, path, parent_labeler(path)))
    if not found[TRAIN]:
        raise ShardError(
            f"{src}: no training images (files with an image extension in {where}); "
            f"{len(skipped)} files left out, e.g. {skipped[0]['path'] if skipped else '-'}"
        )
    labels = CategoryProcessor().fit(label for _, _, label in found[TRAIN])
    for rel, _, label in found[VALID]:
        if label not in labels.vocab.index:
            raise ShardError(
                f"{src}: validation label {label!r} (e.g. {rel}) has no training images, so "
                f"it is not in the training vocab {labels.vocab.names}; add images to its "
                "train/ class folder or move the validation folder out of SRC"
            )
    rng = random.Random(seed)
    jobs = {}
    for split in SPLITS:
        items = found[split]
        indices = labels.encode([lb for _, _, lb in items], [p for _, p, _ in items])
        split_jobs = [
            Job(split, rel, str(path), label, index, file_size(str(path)))
            for (rel, path, label), index in zip(items, indices, strict=True)
        ]
        rng.shuffle(split_jobs)  # every shard mixes classes; same seed, same order
        jobs[split] = split_jobs
    return Plan(layout, labels.vocab, jobs, skipped)


def check_src(src: Path) -> None:
    if not src.exists():
        raise ShardError(f"{src}: SRC does not exist")
    if not src.is_dir():
        raise ShardError(f"{src}: SRC is a file; expected a folder of class folders")


def _layout(src: Path, valid_pct: float | None) -> str:
    has_train = (src / "train").is_dir()
    has_valid = (src / "val").is_dir() or (src / "valid").is_dir()
    if valid_pct is None:
        if not has_train:
            raise ShardError(
                f"{src}: no train/ folder; for the ImageNet layout put images in "
                "train/<class>/ and val/<class>/, or for a flat tree of class folders pass "
                "--valid-pct P (e.g. 0.2)"
            )
        return "imagenet"
    if has_train and has_valid:
        raise ShardError(
            f"{src}: has train/ and val/ folders (ImageNet layout), which --valid-pct would "
            "treat as two classes; drop --valid-pct"
        )
    return "flat"


def shard_bytes(jobs: list[Job], shard_size: int | None, workers: int) -> int:
    """Bytes per shard: `shard_size` as given, else 256 MB scaled down for small splits.

    Scaled so a split of enough images gets at least max(MIN_SHARDS, workers) shards (one
    per stream reader or more), but never fewer than MIN_SHARD_IMAGES images per shard.
    """
    if shard_size is not None:
        return int(shard_size)
    if not jobs:
        return DEFAULT_SHARD_SIZE
    total = sum(_estimated_sample_size(job) for job in jobs)
    wanted = max(1, min(max(MIN_SHARDS, workers), len(jobs) // MIN_SHARD_IMAGES))
    return min(DEFAULT_SHARD_SIZE, math.ceil(total / wanted))


def _estimated_sample_size(job: Job) -> int:
    info = encode_info(job.rel, job.label)
    return sample_size(b"\0" * job.size, b"0000", info)


# --- 2. check, in worker processes -------------------------------------------------------


def _chunks(jobs: list[Job]) -> Iterator[list[Job]]:
    """Consecutive jobs in groups of at most CHUNK_FILES files or CHUNK_BYTES bytes."""
    chunk: list[Job] = []
    size = 0
    for job in jobs:
        if chunk and (len(chunk) >= CHUNK_FILES or size + job.size > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(job)
        size += job.size
    if chunk:
        yield chunk


def checked(
    jobs: list[Job], workers: int, max_pixels: int | None, max_size: int | None
) -> Iterator[tuple[Job, CheckedImage | tuple[str, str]]]:
    """(job, result) in job order; results come from `workers` processes (1: this one).

    At most IN_FLIGHT_PER_WORKER chunks per worker are submitted ahead of the one being
    written, so memory holds a fixed number of images whatever the size of SRC.
    """
    def task(chunk: list[Job]) -> tuple:
        items = [(job.path, job.split == TRAIN) for job in chunk]
        return check_files, items, max_pixels, max_size

    chunks = _chunks(jobs)
    if workers <= 1:
        for chunk in chunks:
            fn, *args = task(chunk)
            yield from zip(chunk, fn(*args), strict=True)
        return
    # forkserver: workers start from a clean process, safe even if the caller runs threads
    context = multiprocessing.get_context("forkserver")
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(*task(chunk))))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                done_chunk, future = pending.popleft()
                yield from zip(done_chunk, future.result(), strict=True)
        while pending:
            done_chunk, future = pending.popleft()
            yield from zip(done_chunk, future.result(), strict=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- 3. write ------------------------------------------------------------------------------


def prepare_out(out: Path, src: Path, force: bool) -> None:
    """Refuse an unusable OUT before any work; with `force`, clear an earlier run's files.

    Only tench's own names are removed (`meta.json` first, then `<split>-NNNNNN.tar` and
    hidden `.partial` temp files); anything else in OUT is left alone.
    """
    if out.resolve() == src.resolve() or out.resolve().is_relative_to(src.resolve()):
        raise ShardError(f"{out}: OUT is inside SRC {src}; pick an OUT outside it")
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: OUT exists and is a file, not a folder; pick another OUT")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass  # proves we may create files there (a read-only disk, missing permission)
    except OSError as e:
        raise ShardError(f"{out}: cannot write to OUT ({e.strerror or e})") from None
    existing = sorted(p.name for p in out.iterdir())
    if existing and not force:
        raise ShardError(
            f"{out}: OUT is not empty ({len(existing)} entries, e.g. {existing[0]!r}); pass "
            "--force to replace an earlier run's shards and meta.json, or pick an empty folder"
        )
    if force:
        (out / META_NAME).unlink(missing_ok=True)  # first: the folder stops looking complete
        for name in existing:
            if _OWN_FILE.match(name) or (name.startswith(".") and name.endswith(TMP_SUFFIX)):
                (out / name).unlink(missing_ok=True)


class _Progress:
    """A fastprogress bar on a terminal, a plain line every ~10% elsewhere, or nothing."""

    def __init__(self, total: int, show: bool):
        self.total, self.show, self.start = total, show, time.perf_counter()
        self.bar = None
        self.next_line = 0
        if show and sys.stdout.isatty():
            from fastprogress.fastprogress import progress_bar

            self.bar = progress_bar(range(total))
            self.bar.update(0)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done)
        elif self.show and (done >= self.next_line or done == self.total):
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            print(f"checked {done:,}/{self.total:,} files ({rate:,.0f}/s)", flush=True)
            self.next_line = done + max(1, self.total // 10)


def write_shards(
    out: Path, plan_: Plan, *, shard_size: int | None, max_count: int | None, workers: int,
    max_pixels: int | None, max_size: int | None, on_error: str, progress: bool,
) -> tuple[dict[str, list[ShardInfo]], np.ndarray, list[dict], collections.Counter]:  # fmt: skip
    """Check and write every planned file; (shards per split, RGB histogram, skipped, formats).

    On any exception the shards finished by this call are deleted again.
    """
    histogram = np.zeros(768, dtype=np.int64)
    skipped: list[dict] = []
    formats: collections.Counter = collections.Counter()
    all_jobs = [job for split in SPLITS for job in plan_.jobs[split]]
    bar = _Progress(len(all_jobs), progress)
    writers: dict[str, ShardWriter] = {}
    try:
        with contextlib.ExitStack() as stack:
            for split in SPLITS:
                max_bytes = shard_bytes(plan_.jobs[split], shard_size, workers)
                writers[split] = stack.enter_context(
                    ShardWriter(out, split, max_bytes, max_count=max_count)
                )
            for done, (job, result) in enumerate(
                checked(all_jobs, workers, max_pixels, max_size), start=1
            ):
                if isinstance(result, CheckedImage):
                    writers[job.split].write(
                        sample_key(job.rel), result.ext, result.data, job.label_index,
                        encode_info(job.rel, job.label),
                    )
                    formats[result.ext] += 1
                    formats["reencoded"] += result.reencoded
                    if result.histogram is not None:
                        histogram += result.histogram
                else:
                    kind, detail = result
                    if on_error == "fail":
                        raise ShardError(f"{job.path}: {kind}: {detail} (--on-error fail)")
                    skipped.append({"path": job.rel, "reason": f"{kind}: {detail}"})
                bar.update(done)
    except BaseException:
        for writer in writers.values():
            for info in writer.shards:
                (out / info.name).unlink(missing_ok=True)
        raise
    return {split: w.shards for split, w in writers.items()}, histogram, skipped, formats


# --- the API and the command -------------------------------------------------------------


def shard_folder(
    src: str | Path, out: str | Path, *, valid_pct: float | None = None, seed: int = 0,
    shard_size: int | None = None, max_count: int | None = None, max_size: int | None = None,
    workers: int | None = None, on_error: str = "skip", force: bool = False,
    progress: bool = True, max_pixels: int | None = None,
) -> dict:  # fmt: skip
    """Shard the images under `src` into `out`; return the `meta.json` object written.

    `valid_pct`: split a flat tree of class folders at random (by `seed`) instead of the
    ImageNet layout. `max_pixels`: refuse images with more pixels (default: Pillow's
    decompression-bomb limit). `progress`: show a progress bar and print the summary.
    Raises `ShardError` (a clear message) for anything that stops the run.
    """
    src, out = Path(src), Path(out)
    _check_options(valid_pct, shard_size, max_count, max_size, workers, on_error, max_pixels)
    workers = default_workers() if workers is None else workers
    start = time.perf_counter()
    check_src(src)
    made_out = not out.exists()
    prepare_out(out, src, force)
    try:
        plan_ = plan(src, valid_pct, seed)
        shards, histogram, skipped, formats = write_shards(
            out, plan_, shard_size=shard_size, max_count=max_count, workers=workers,
            max_pixels=max_pixels, max_size=max_size, on_error=on_error, progress=progress,
        )  # fmt: skip
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
    reencoded = formats.pop("reencoded", 0)
    meta = build_meta(
        plan_.vocab, shards, histogram, plan_.skipped + skipped,
        layout=plan_.layout, source=str(src.resolve()),
        options={"valid_pct": valid_pct, "seed": seed, "shard_size": shard_size,
                 "max_count": max_count, "max_size": max_size,
                 "max_pixels": pixel_limit(max_pixels)},
        reencoded=reencoded, formats=dict(sorted(formats.items())),
    )  # fmt: skip
    write_meta(out, meta)
    if progress:
        for line in summary_lines(meta, time.perf_counter() - start):
            print(line)
        print(f"wrote {out / META_NAME}")
    return meta


def _check_options(valid_pct, shard_size, max_count, max_size, workers, on_error, max_pixels):
    if valid_pct is not None and not 0.0 < valid_pct < 1.0:
        raise ShardError(f"--valid-pct must be between 0 and 1 (a fraction), got {valid_pct}")
    for name, value in (("--shard-size", shard_size), ("--max-count", max_count),
                        ("--max-size", max_size), ("--workers", workers),
                        ("--max-pixels", max_pixels)):  # fmt: skip
        if value is not None and value < 1:
            raise ShardError(f"{name} must be at least 1, got {value}")
    if on_error not in ON_ERROR:
        raise ShardError(f"--on-error must be one of {ON_ERROR}, got {on_error!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", type=Path,
                        help="train/<class>/ + val/<class>/ (ImageNet layout), or <class>/ "
                             "folders with --valid-pct")  # fmt: skip
    parser.add_argument("out", metavar="OUT", type=Path, help="folder for the shards and meta.json")
    parser.add_argument("--valid-pct", type=float, default=None,
                        help="flat tree: fraction of each class folder's files for validation")
    parser.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="bytes per shard (default 256 MB, smaller for small sets)")
    parser.add_argument("--max-count", type=int, default=None, help="images per shard at most")
    parser.add_argument("--max-size", type=int, default=None, metavar="PX",
                        help="shrink so the shorter side is at most PX and re-encode "
                             "(default: keep the original bytes)")  # fmt: skip
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="skip images with more pixels (default Pillow's bomb limit)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that read and check images (default: all cores)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="skip",
                        help="a file that is not a usable image: skip it and report it (default) "
                             "or stop the run")  # fmt: skip
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier run's shards in OUT (and its leftover temp files)")


def main(args: argparse.Namespace) -> int:
    try:
        shard_folder(
            args.src, args.out, valid_pct=args.valid_pct, seed=args.seed,
            shard_size=args.shard_size, max_count=args.max_count, max_size=args.max_size,
            workers=args.workers, on_error=args.on_error, force=args.force,
            max_pixels=args.max_pixels,
        )  # fmt: skip
    except ShardError as e:
        print(f"tench shard: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # `python -m shards.sharder SRC OUT`, same as `tench shard`
    _parser = argparse.ArgumentParser(prog="tench shard", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
