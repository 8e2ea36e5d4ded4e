"""Lazy item lists and the split -> label flow of the Data Block API.

`ImageList.from_files(path)` holds file paths only; an image is opened when it is
indexed, so a data set larger than memory costs one path per item. The flow

    ImageList.from_files(path).split(grandparent_splitter).label(parent_labeler)

gives `LabeledData` whose train and valid halves share one `CategoryProcessor`, its
vocab learnt from the training labels alone.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shards.blocks import CategoryProcessor, split_items
from shards.files import get_files, image_extensions
from shards.vocab import Vocab

Transform = Callable[[Any], Any]  # may carry an `order` attribute; lower runs first


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
    of those. `il.items` are the raw items. Subclasses override `get`.
    """

    def __init__(self, items: Iterable[Any], path: str | Path = ".", tfms: Sequence = ()):
        self.items = list(items)
        self.path = Path(path)
        self.tfms = list(tfms or ())

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

    def split(self, splitter: Callable[[Any], str | None]) -> SplitData:
        """Train and valid lists by `splitter(item) -> "train" | "valid" | None`."""
        train, valid = split_items(self.items, splitter)
        return SplitData(self.new(train), self.new(valid))

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
        return cls(get_files(path, extensions, recurse, include), path=path, tfms=tfms)

    def get(self, item: str | Path) -> Image.Image:
        # load() reads the pixels and closes the file, so no handle outlives the call
        with Image.open(item) as image:
            image.load()
        return image


class SplitData:
    """A train list and a valid list of the same kind."""

    def __init__(self, train: ItemList, valid: ItemList):
        self.train = train
        self.valid = valid

    def label(
        self, labeler: Callable[[Any], str], processor: CategoryProcessor | None = None
    ) -> LabeledData:
        """Label both lists with `labeler`, through one processor.

        The processor's vocab comes from the training labels unless it already has one
        (e.g. loaded from a shards folder), in which case it is used as is.
        """
        processor = CategoryProcessor() if processor is None else processor
        train_names = [labeler(item) for item in self.train.items]
        valid_names = [labeler(item) for item in self.valid.items]
        if processor.vocab is None:
            processor.fit(train_names)
        return LabeledData(
            LabeledList(self.train, processor.encode(train_names, self.train.items), processor),
            LabeledList(self.valid, processor.encode(valid_names, self.valid.items), processor),
            processor,
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

    def __init__(self, train: LabeledList, valid: LabeledList, processor: CategoryProcessor):
        self.train = train
        self.valid = valid
        self.processor = processor

    @property
    def vocab(self) -> Vocab:
        return self.processor.vocab

    def __repr__(self) -> str:
        return f"LabeledData\nTrain: {self.train!r}\nValid: {self.valid!r}\nVocab: {self.vocab!r}"
