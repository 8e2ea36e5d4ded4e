"""Plan a sharding run before reading any image: which files, in which order, in which shard.

`plan` takes the labelled files of each split (`shards.items.LabeledData`) and shuffles
each split with the seed so every shard mixes classes. `assign_shards` then cuts each
split into shards by the files' sizes. Deciding every shard's contents up front is what
lets `tench shard` write shards in parallel and still produce the same shards, byte for
byte, for any number of processes.
"""

from __future__ import annotations

import math
import random
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shards.files import relative_path
from shards.format import CHECKSUM_SIZE, TRAIN, VALID, encode_info
from shards.images import file_size
from shards.vocab import Vocab
from shards.writer import sample_size

DEFAULT_SHARD_SIZE = 256 * 1000 * 1000
MIN_SHARDS = 8  # per split, when the split has enough images: one shard per reader or more
MIN_SHARD_IMAGES = 8  # ... but no fewer images than this in a scaled-down shard
STATS_IMAGES = 1000  # training images whose pixels give the mean/std (all, if fewer)
TAR_END = 2 * tarfile.BLOCKSIZE


class ShardError(RuntimeError):
    """A sharding run that cannot go on; the message says what, where and what to do."""


class Labelled(Protocol):
    """What the sharder reads of a `shards.items.LabeledData`."""

    path: Path  # the folder the files are under
    train: Any  # LabeledList: `.x.items` (paths), `.y` (label indices), `.label_names`
    valid: Any
    vocab: Vocab
    skipped: list[tuple[Any, str]]  # (path, reason) of files found but not taken


@dataclass(slots=True)  # one per file of SRC: kept small
class Job:
    """One source file to check and, if it decodes, write as one sample."""

    split: str
    rel: str  # path relative to SRC, with "/" on every system
    label: str
    label_index: int
    size: int  # bytes on disk


@dataclass
class ShardTask:
    """The files of one shard, decided before any is read."""

    split: str
    index: int
    jobs: list[Job]
    stats_images: int = 0  # how many of its images go into the mean/std sample


@dataclass
class Plan:
    vocab: Vocab
    jobs: dict[str, list[Job]]  # split -> jobs in write (shuffled) order
    skipped: list[dict]  # files left out before reading, {"path", "reason"}, in path order


def plan(data: Labelled, seed: int = 0) -> Plan:
    """Each split's files with their labels, shuffled by `seed`; nothing is read."""
    root = Path(data.path)
    if not len(data.train):
        raise ShardError(f"{root}: no training images to shard")
    rng = random.Random(seed)
    jobs = {}
    for split, part in ((TRAIN, data.train), (VALID, data.valid)):
        split_jobs = [
            # interned: one string per class, not per file (a plan holds every file of SRC)
            Job(split, relative(path, root), sys.intern(label), index, file_size(str(path)))
            for path, label, index in zip(part.x.items, part.label_names, part.y, strict=True)
        ]
        rng.shuffle(split_jobs)  # every shard mixes classes; same seed, same order
        jobs[split] = split_jobs
    skipped = [{"path": relative(path, root), "reason": reason} for path, reason in data.skipped]
    skipped.sort(key=lambda entry: Path(entry["path"]))  # the order `get_files` lists them
    return Plan(data.vocab, jobs, skipped)


def relative(path: str | Path, root: Path) -> str:
    """`path` relative to `root`, with "/": how shards and meta.json name a file."""
    rel = relative_path(path, root)
    if rel == ".." or rel.startswith("../"):
        raise ShardError(f"{path}: not under {root}; give the item list a path that holds "
                         "every file")  # fmt: skip
    return rel


def shard_bytes(jobs: list[Job], shard_size: int | None, processes: int) -> int:
    """Bytes per shard: `shard_size` as given, else 256 MB scaled down for small splits.

    Scaled so a split of enough images gets at least max(MIN_SHARDS, processes) shards (one
    per stream reader or more, one per sharder process), but never fewer than
    MIN_SHARD_IMAGES images per shard.
    """
    if shard_size is not None:
        return int(shard_size)
    if not jobs:
        return DEFAULT_SHARD_SIZE
    total = tar_bytes(sum(_estimated_sample_size(job) for job in jobs))
    wanted = max(1, min(max(MIN_SHARDS, processes), len(jobs) // MIN_SHARD_IMAGES))
    return min(DEFAULT_SHARD_SIZE, math.ceil(total / wanted))


def _estimated_sample_size(job: Job) -> int:
    """Tar bytes of the sample: exact in copy mode (the image keeps its bytes)."""
    info = encode_info(job.rel, job.label)
    label = str(job.label_index).encode()
    return member_bytes(job.size) + sample_size(label, info) + member_bytes(CHECKSUM_SIZE)


def member_bytes(size: int) -> int:
    """A tar member of `size` bytes: a header block, then the data padded to whole blocks."""
    return tarfile.BLOCKSIZE + math.ceil(size / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_bytes(members: int) -> int:
    """A tar's size: its members, two zero blocks, padded to a whole record (`tarfile`)."""
    return math.ceil((members + TAR_END) / tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def assign_shards(split: str, jobs: list[Job], max_bytes: int,
                  max_count: int | None) -> list[ShardTask]:
    """Cut the (shuffled) jobs of a split into consecutive shards of at most `max_bytes`.

    Sizes come from the source files, so in copy mode (original bytes) the cap is exact; a
    sample larger than `max_bytes` gets a shard of its own. Deciding every shard's contents
    here, before any image is read, is what lets processes write shards in parallel and still
    give the same shards, byte for byte, for any number of them.
    """
    tasks: list[ShardTask] = []
    current: list[Job] = []
    size = 0
    for job in jobs:
        sample = _estimated_sample_size(job)
        full = max_count is not None and len(current) >= max_count
        if current and (full or tar_bytes(size + sample) > max_bytes):
            tasks.append(ShardTask(split, len(tasks), current))
            current, size = [], 0
        current.append(job)
        size += sample
    if current:
        tasks.append(ShardTask(split, len(tasks), current))
    return tasks


def spread_stats_sample(tasks: list[ShardTask], images: int = STATS_IMAGES) -> None:
    """Ask each training shard for its share of the `images` sampled for mean/std.

    Shares are proportional to shard sizes (rounded up, so they add up to at least
    `images`), and the jobs are already shuffled, so the first images of every shard are
    a uniform random sample of the training set. A shard counts only images it writes, so
    a skipped file shrinks the sample only if its shard runs out of images. Counting every
    pixel of every image would cost ~30% of the decode time for no better estimate.
    """
    train = [task for task in tasks if task.split == TRAIN]
    total = sum(len(task.jobs) for task in train)
    for task in train:
        task.stats_images = math.ceil(images * len(task.jobs) / total)
