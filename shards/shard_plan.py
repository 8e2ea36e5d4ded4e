"""Plan a sharding run before reading any image: which files, which split, label, order, shard.

`plan` lists SRC (`get_files`), splits it (ImageNet `train/` + `val/`, or a flat tree of
class folders with `--valid-pct`), labels each file by its parent folder, builds the vocab
from the training labels only, and shuffles each split with the seed so every shard mixes
classes. `assign_shards` then cuts each split into shards by the files' sizes. Deciding
every shard's contents up front is what lets `tench shard` write shards in parallel and
still produce the same shards, byte for byte, for any number of workers.
"""

from __future__ import annotations

import math
import random
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shards.blocks import (
    TRAIN,
    VALID,
    CategoryProcessor,
    grandparent_splitter,
    parent_labeler,
    random_splitter,
)
from shards.files import get_files, image_extensions
from shards.format import SPLITS, encode_info
from shards.images import file_size
from shards.vocab import Vocab
from shards.writer import sample_size

DEFAULT_SHARD_SIZE = 256 * 1000 * 1000
MIN_SHARDS = 8  # per split, when the split has enough images: one shard per reader or more
MIN_SHARD_IMAGES = 8  # ... but no fewer images than this in a scaled-down shard
STATS_IMAGES = 1000  # training images whose pixels give the mean/std (all, if fewer)
NO_EXTENSION = "no image extension"
OUTSIDE = "outside the layout"
TAR_END = 2 * tarfile.BLOCKSIZE


class ShardError(RuntimeError):
    """A sharding run that cannot go on; the message says what, where and what to do."""


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
    layout: str  # "imagenet" or "flat"
    vocab: Vocab
    jobs: dict[str, list[Job]]  # split -> jobs in write (shuffled) order
    skipped: list[dict]  # files left out before reading: no image extension, outside layout


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
    found: dict[str, list[tuple[str, str, int]]] = {TRAIN: [], VALID: []}  # rel, label, size
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
        # interned: one string per class, not per file (a plan holds every file of SRC)
        found[split].append((rel, sys.intern(parent_labeler(path)), file_size(str(path))))
    del files
    if not found[TRAIN]:
        raise ShardError(
            f"{src}: no training images (files with an image extension in {where}); "
            f"{len(skipped)} files left out, e.g. {skipped[0]['path'] if skipped else '-'}"
        )
    labels = CategoryProcessor().fit(label for _, label, _ in found[TRAIN])
    for rel, label, _ in found[VALID]:
        if label not in labels.vocab.index:
            raise ShardError(
                f"{src}: validation label {label!r} (e.g. {rel}) has no training images, so "
                f"it is not in the training vocab {labels.vocab.names}; add images to its "
                "train/ class folder or move the validation folder out of SRC"
            )
    rng = random.Random(seed)
    jobs = {}
    for split in SPLITS:
        items = found.pop(split)
        indices = labels.encode([label for _, label, _ in items], [rel for rel, _, _ in items])
        split_jobs = [
            Job(split, rel, label, index, size)
            for (rel, label, size), index in zip(items, indices, strict=True)
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
    total = tar_bytes(sum(_estimated_sample_size(job) for job in jobs))
    wanted = max(1, min(max(MIN_SHARDS, workers), len(jobs) // MIN_SHARD_IMAGES))
    return min(DEFAULT_SHARD_SIZE, math.ceil(total / wanted))


def _estimated_sample_size(job: Job) -> int:
    """Tar bytes of the sample: exact in copy mode (the image keeps its bytes)."""
    info = encode_info(job.rel, job.label)
    label = str(job.label_index).encode()
    return member_bytes(job.size) + sample_size(label, info)


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
    here, before any image is read, is what lets workers write shards in parallel and still
    give the same shards, byte for byte, for any number of workers.
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
