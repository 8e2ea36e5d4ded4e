"""Lazy item lists and the list -> split -> label -> shards flow of the Data Block API.

`ImageList.from_files(path)` holds file paths only; an image is opened when it is
indexed, so a data set larger than memory costs one path per item. The flow

    ImageList.from_files(path).split(grandparent_splitter).label(parent_labeler)

gives `LabeledData` whose train and valid halves share one `CategoryProcessor`, its
vocab learnt from the training labels alone, and `.to_shards(out)` writes it as tar
shards. `tench shard` is this same flow, with the splitter and labeler its flags name.
Files found but not taken (no image extension, left out by the splitter, missing from a
labels CSV) travel along in `skipped`, so `meta.json` can say what was left out and why.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shards.blocks import CategoryProcessor, LabelError, partition_items
from shards.files import get_files, image_extensions, normalise_extensions, relative_path
from shards.labels_csv import LabelsCsv
from shards.shard_run import shard_data
from shards.vocab import Vocab

Transform = Callable[[Any], Any]  # may carry an `order` attribute; lower runs first
Skipped = list[tuple[Any, str]]  # (item, why it was left out)
NO_EXTENSION = "no image extension"
NOT_IN_CSV = "not in the labels CSV"
LEFT_OUT = "left out by the splitter"


def compose(x: Any, tfms: Iterable[Transform]) -> Any:
    """Apply `tfms` to `x` in order of their `order` attribute (0 if absent; ties keep
    the given order)."""
    for tfm in sorted(tfms, key=lambda t: getattr(t, "order", 0)):
        x = tfm(x)
    return x


def positions(index: Any, length: int) -> int | list[int]:
    """What `index` picks from a sequence of `length`: one position or a list of them.

    Accepts an int, a slice, a list of ints, or a list of bools as long as the sequence
    (a mask); numpy arrays and torch tensors of those too. Negative ints count from the
    end, as in a list.
    """
    if isinstance(index, slice):
        return list(range(length))[index]
    try:
        operator.index(index)  # int, numpy int, 0-d integer array or tensor
    except TypeError:
        pass
    else:
        return _position(index, length)
    if not isinstance(index, (str, bytes)) and hasattr(index, "__iter__"):
        # numpy arrays and tensors -> Python ints/bools, so a bool tensor is seen as a mask
        picks = index.tolist() if hasattr(index, "tolist") else list(index)
        if picks and all(isinstance(p, (bool, np.bool_)) for p in picks):
            if len(picks) != length:
                raise IndexError(f"boolean mask of length {len(picks)} for {length} items")
            return [i for i, keep in enumerate(picks) if keep]
        return [_position(p, length) for p in picks]
    return _position(index, length)


def _position(index: Any, length: int) -> int:
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(
            f"cannot index items with {type(index).__name__}; use an int, a slice, "
            "a list of ints or a boolean mask"
        ) from None
    if not -length <= i < length:
        raise IndexError(f"index {i} out of range for {length} items")
    return i % length


class ItemList:
    """A list of items (usually paths) that turns into data only when indexed.

    `il[i]` is `get(items[i])` passed through `tfms`; `il[slice | list | mask]` is a list
    of those. `il.items` are the raw items; `il.skipped` the (item, reason) pairs found but
    not taken. Subclasses override `get`.
    """

    def __init__(
        self, items: Iterable[Any], path: str | Path = ".", tfms: Sequence = (),
        skipped: Skipped = (),
    ):  # fmt: skip
        self.items = list(items)
        self.path = Path(path)
        self.tfms = list(tfms or ())
        self.skipped = list(skipped)

    def get(self, item: Any) -> Any:
        return item

    def transformed(self, item: Any) -> Any:
        """`get` then the transforms: what indexing returns for one item."""
        return compose(self.get(item), self.tfms)

    def __getitem__(self, index: Any) -> Any:
        picked = positions(index, len(self.items))
        if isinstance(picked, int):
            return self.transformed(self.items[picked])
        return [self.transformed(self.items[i]) for i in picked]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return (self.transformed(item) for item in self.items)

    def new(self, items: Iterable[Any]) -> ItemList:
        """A list of the same kind, path and transforms holding other items."""
        return type(self)(items, path=self.path, tfms=self.tfms)

    def split(self, splitter: Callable[[Any], str | None], left_out: str = LEFT_OUT) -> SplitData:
        """Train and valid lists by `splitter(item) -> "train" | "valid" | None`.

        Items mapped to None join `skipped`, `left_out` their reason.
        """
        train, valid, dropped = partition_items(self.items, splitter)
        skipped = self.skipped + [(item, left_out) for item in dropped]
        return SplitData(self.new(train), self.new(valid), skipped)

    def __repr__(self) -> str:
        shown = ", ".join(repr(o) for o in self.items[:10])
        more = f", ... ({len(self) - 10} more)" if len(self) > 10 else ""
        return f"{type(self).__name__} ({len(self)} items)\n[{shown}{more}]\nPath: {self.path}"


class ImageList(ItemList):
    """Image file paths; indexing opens and decodes the image with PIL."""

    @classmethod
    def from_files(
        cls,
        path: str | Path,
        extensions: Iterable[str] | None = image_extensions,
        recurse: bool = True,
        include: Iterable[str] | None = None,
        tfms: Sequence = (),
    ) -> ImageList:
        """The files under `path` with one of `extensions` (None: every file), sorted;
        the others are in `skipped`."""
        wanted = normalise_extensions(extensions)
        reason = NO_EXTENSION if wanted == image_extensions else "extension not asked for"
        items, skipped = [], []
        for file in get_files(path, None, recurse, include):
            if wanted is None or file.suffix.lower() in wanted:
                items.append(file)
            else:
                skipped.append((file, f"{reason}: {file.suffix or 'none'}"))
        return cls(items, path=path, tfms=tfms, skipped=skipped)

    @classmethod
    def from_csv(cls, path: str | Path, csv: str | Path | LabelsCsv, tfms: Sequence = ()
                 ) -> ImageList:  # fmt: skip
        """The files a labels CSV names (see `shards.labels_csv`), relative to `path`, sorted.

        A row naming a file that does not exist is a `LabelError` naming the row. Files
        under `path` the CSV does not list are not taken; they are in `skipped`.
        """
        labels = csv if isinstance(csv, LabelsCsv) else LabelsCsv(csv, path)
        if labels.root != os.path.abspath(path):
            raise ValueError(f"{labels!r} reads paths relative to {labels.root}, not {path}")
        labels.check_files()
        items = sorted(Path(path, rel) for rel in labels.rows)
        skipped = []
        for file in get_files(path):
            if relative_path(file, path) in labels.rows:
                continue
            if file.suffix.lower() in image_extensions:
                skipped.append((file, f"{NOT_IN_CSV}: {labels.csv_path.name}"))
            else:
                skipped.append((file, f"{NO_EXTENSION}: {file.suffix or 'none'}"))
        return cls(items, path=path, tfms=tfms, skipped=skipped)

    def get(self, item: str | Path) -> Image.Image:
        # load() reads the pixels and closes the file, so no handle outlives the call
        with Image.open(item) as image:
            image.load()
        return image


class SplitData:
    """A train list and a valid list of the same kind, and what the split left out."""

    def __init__(self, train: ItemList, valid: ItemList, skipped: Skipped = ()):
        self.train = train
        self.valid = valid
        self.skipped = list(skipped)

    def label(
        self, labeler: Callable[[Any], str], processor: CategoryProcessor | None = None
    ) -> LabeledData:
        """Label both lists with `labeler`, through one processor.

        The processor's vocab comes from the training labels unless it already has one
        (e.g. loaded from a shards folder), in which case it is used as is. Every item is
        labelled before any error is raised, so a `LabelError` says how many items failed
        and names the first; a validation label with no training items is one too.
        """
        processor = CategoryProcessor() if processor is None else processor
        train_names, valid_names = label_all(labeler, self.train.items, self.valid.items)
        if processor.vocab is None:
            processor.fit(train_names)
            if processor.unseen == "error":
                check_seen(processor.vocab, valid_names, self.valid)
        return LabeledData(
            LabeledList(self.train, processor.encode(train_names, self.train.items), processor),
            LabeledList(self.valid, processor.encode(valid_names, self.valid.items), processor),
            processor,
            self.skipped,
        )

    def __repr__(self) -> str:
        return f"SplitData\nTrain: {self.train!r}\nValid: {self.valid!r}"


class LabeledList:
    """Inputs `x` (an ItemList) with label indices `y`; `ll[i]` is `(x[i], y[i])`."""

    def __init__(self, x: ItemList, y: Sequence[int], processor: CategoryProcessor):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} items but {len(y)} labels")
        self.x = x
        self.y = list(y)
        self.processor = processor

    @property
    def label_names(self) -> list[str]:
        return self.processor.decode(self.y)

    def __getitem__(self, index: Any) -> Any:
        picked = positions(index, len(self.y))
        if isinstance(picked, int):
            return self.x[picked], self.y[picked]
        return list(zip(self.x[picked], (self.y[i] for i in picked), strict=True))

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return f"LabeledList ({len(self)} items, {len(set(self.y))} classes)\nx: {self.x!r}"


class LabeledData:
    """Labelled train and valid lists sharing one `CategoryProcessor`."""

    def __init__(self, train: LabeledList, valid: LabeledList, processor: CategoryProcessor,
                 skipped: Skipped = ()):  # fmt: skip
        self.train = train
        self.valid = valid
        self.processor = processor
        self.skipped = list(skipped)

    @property
    def vocab(self) -> Vocab:
        return self.processor.vocab

    @property
    def path(self) -> Path:
        """The folder the items are under; shards name each file relative to it."""
        return self.train.x.path

    def to_shards(self, out: str | Path, **options: Any) -> dict:
        """Write both splits as webdataset tar shards + `meta.json` in `out`; return the meta.

        Every image is fully decoded first (unusable ones are skipped and reported). The
        options (`seed`, `processes`, `shard_size`, `max_count`, `max_size`, `on_error`,
        `force`, ...) are those of `shards.shard_run.shard_data`, which does the work.
        """
        return shard_data(self, out, **options)

    def __repr__(self) -> str:
        return f"LabeledData\nTrain: {self.train!r}\nValid: {self.valid!r}\nVocab: {self.vocab!r}"


def label_all(labeler: Callable[[Any], str], *lists: Sequence) -> list[list[str]]:
    """The labels of every item of each list; one `LabelError` counting all that failed."""
    labelled, failures = [], []
    for items in lists:
        names = []
        for item in items:
            try:
                names.append(labeler(item))
            except LabelError as e:
                failures.append(e)
        labelled.append(names)
    if failures:
        total = sum(len(items) for items in lists)
        if len(failures) == total:
            raise LabelError(f"none of the {total} files can be labelled; e.g. {failures[0]}")
        raise LabelError(
            f"{len(failures)} of the {total} files cannot be labelled; e.g. {failures[0]}"
        )
    return labelled


def check_seen(vocab: Vocab, valid_names: Sequence[str], valid: ItemList) -> None:
    """A validation label missing from the training vocab is an error naming it and a file."""
    for name, item in zip(valid_names, valid.items, strict=True):
        if name not in vocab.index:
            try:
                shown = Path(item).relative_to(valid.path).as_posix()
            except (TypeError, ValueError):
                shown = str(item)
            raise LabelError(
                f"validation label {name!r} (e.g. {shown}) has no training images, so it is "
                f"not in the training vocab {vocab.names}; add training images labelled "
                f"{name!r} or leave its validation images out (in Python, "
                "CategoryProcessor(unseen='other') maps such labels to an extra class)"
            )
