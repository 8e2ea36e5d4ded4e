"""Data Block pieces: splitters, labelers and the label processor.

A splitter maps one file path to ``"train"``, ``"valid"`` or None (leave the file out).
A labeler maps one file path to a label name (CSV labels: `shards.labels_csv`).
`CategoryProcessor` turns label names into indices with a vocab built from the training
split only, so validation can never change what an index means.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from shards.atomic import atomic_write_text
from shards.files import relative_path
from shards.format import TRAIN, VALID
from shards.vocab import UnknownLabelError, Vocab

Splitter = Callable[[Path], "str | None"]
Labeler = Callable[[Path], str]
T = TypeVar("T")


class LabelError(ValueError):
    """A file that cannot be given a label; the message names the file."""


# --- splitters -------------------------------------------------------------------------


def grandparent_splitter(
    path: str | Path, valid_names: Sequence[str] = ("val", "valid"), train_name: str = "train"
) -> str | None:
    """ImageNet layout: `train/<class>/x.jpg` -> "train", `val/<class>/x.jpg` -> "valid"."""
    if isinstance(valid_names, str):  # ("val") is a str, not a tuple
        valid_names = (valid_names,)
    grandparent = Path(path).parent.parent.name
    if grandparent == train_name:
        return TRAIN
    if grandparent in valid_names:
        return VALID
    return None


def top_folder_splitter(
    root: str | Path, valid_names: Sequence[str] = ("val", "valid"), train_name: str = "train"
) -> Splitter:
    """Split by the first folder under `root`: `root/train/...` -> "train", `root/val/...`
    -> "valid", anything else None. The same as `grandparent_splitter` for the ImageNet
    layout, and also right when the labels do not come from class folders (`train/x.jpg`).
    """
    valid_names = (valid_names,) if isinstance(valid_names, str) else tuple(valid_names)

    def split(path: str | Path) -> str | None:
        top, _, rest = relative_path(path, root).partition("/")
        if not rest:  # a file directly in root
            return None
        if top == train_name:
            return TRAIN
        return VALID if top in valid_names else None

    return split


def random_splitter(valid_pct: float, seed: int = 0, root: str | Path | None = None) -> Splitter:
    """Each file goes to "valid" with probability `valid_pct`, decided by a hash of its path.

    The hash (sha256 of the seed and the path relative to `root`, or the path as given
    when `root` is None) makes the choice per file: the same seed always splits the same
    files the same way, on any machine and in any order, and adding files never moves
    the ones already there. The price: the valid fraction is `valid_pct` on average, not
    exactly (1,000 files at 0.2 give 175 to 225 valid files 19 times in 20).
    """
    if not 0.0 <= valid_pct <= 1.0:
        raise ValueError(f"valid_pct must be between 0 and 1, got {valid_pct}")
    base = None if root is None else os.path.abspath(root)

    def split(path: str | Path) -> str:
        key = Path(os.path.relpath(os.path.abspath(path), base) if base else path).as_posix()
        digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        return VALID if draw < valid_pct else TRAIN

    return split


def func_splitter(is_valid: Callable[[Path], bool | None]) -> Splitter:
    """Wrap `is_valid(path) -> True (valid) / False (train) / None (drop)` as a splitter."""

    def split(path: str | Path) -> str | None:
        answer = is_valid(Path(path))
        return None if answer is None else (VALID if answer else TRAIN)

    return split


def split_items(items: Iterable[T], splitter: Callable[[T], str | None]) -> tuple[list[T], list[T]]:
    """(train, valid), order kept; items the splitter maps to None are left out."""
    train, valid, _ = partition_items(items, splitter)
    return train, valid


def partition_items(
    items: Iterable[T], splitter: Callable[[T], str | None]
) -> tuple[list[T], list[T], list[T]]:
    """(train, valid, left out): `split_items` that also keeps what it leaves out."""
    sides: dict[str | None, list[T]] = {TRAIN: [], VALID: [], None: []}
    for item in items:
        side = splitter(item)
        if side not in sides:
            raise ValueError(
                f"splitter returned {side!r} for {item}; expected 'train', 'valid' or None"
            )
        sides[side].append(item)
    return sides[TRAIN], sides[VALID], sides[None]


# --- labelers --------------------------------------------------------------------------


def parent_labeler(path: str | Path) -> str:
    """`train/tench/x.jpg` -> "tench": the label is the name of the file's folder."""
    return Path(path).parent.name


def regex_labeler(pattern: str | re.Pattern) -> Labeler:
    """The label is the one group of `pattern` searched in the file name (not the folders).

    `regex_labeler(r"^(.+)_\\d+\\.jpg$")` labels Oxford-IIIT Pets' `great_pyrenees_12.jpg` as
    "great_pyrenees". Exactly one capturing group; use `(?:...)` for any other grouping.
    A file name it does not match raises `LabelError` naming the file.
    """
    regex = re.compile(pattern)
    if regex.groups != 1:
        raise ValueError(
            f"label regex {regex.pattern!r} has {regex.groups} capturing groups, expected "
            "exactly 1: put the label in (...) and write other groups as (?:...)"
        )

    def label(path: str | Path) -> str:
        name = Path(path).name
        match = regex.search(name)
        if match is None or not match.group(1):
            raise LabelError(f"{path}: file name does not match label regex {regex.pattern!r}")
        return match.group(1)

    return label


# --- the label processor ---------------------------------------------------------------


class CategoryProcessor:
    """Label names <-> indices, with the vocab learnt from the training labels only.

    `unseen="error"` (the default): a validation label missing from the training vocab
    is an error naming the label and a file. `unseen="other"`: such labels map to an
    extra class `other_name`, added at `fit` as the LAST index, after the sorted
    training labels, so every training label keeps the index it would have without it.
    """

    UNSEEN_POLICIES = ("error", "other")

    def __init__(
        self, unseen: str = "error", other_name: str = "other", vocab: Vocab | None = None
    ):
        if unseen not in self.UNSEEN_POLICIES:
            raise ValueError(f"unseen must be one of {self.UNSEEN_POLICIES}, got {unseen!r}")
        if unseen == "other" and vocab is not None and other_name not in vocab.index:
            raise ValueError(f"vocab {vocab.names} lacks the unseen class {other_name!r}")
        self.unseen = unseen
        self.other_name = other_name
        self.vocab = vocab

    def fit(self, train_labels: Iterable[str]) -> CategoryProcessor:
        """Build the vocab (sorted, unique) from the training labels; returns self."""
        names = sorted(set(train_labels))
        if not names:
            raise ValueError("no training labels to build a vocab from; is the train split empty?")
        if self.unseen == "other":
            if self.other_name in names:
                raise ValueError(
                    f"a training label is called {self.other_name!r}, the name kept for unseen "
                    "labels; pass another other_name"
                )
            names.append(self.other_name)
        self.vocab = Vocab(names)
        return self

    def _fitted(self) -> Vocab:
        if self.vocab is None:
            raise RuntimeError("CategoryProcessor has no vocab yet; call fit(train_labels) first")
        return self.vocab

    def encode_one(self, label: str, source: str | Path | None = None) -> int:
        vocab = self._fitted()
        if self.unseen == "other":
            return vocab.index.get(label, vocab.index[self.other_name])
        try:
            return vocab.encode(label, None if source is None else str(source))
        except UnknownLabelError as e:
            raise LabelError(
                f"{e}; build the vocab from a train split that has it, or use "
                "unseen='other' to map such labels to an 'other' class"
            ) from None

    def encode(
        self, labels: Iterable[str], sources: Iterable[str | Path] | None = None
    ) -> list[int]:
        """Indices for `labels`; `sources` (the files, in the same order) name errors."""
        labels = list(labels)
        sources = [None] * len(labels) if sources is None else list(sources)
        if len(sources) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(sources)} sources")
        return [self.encode_one(label, src) for label, src in zip(labels, sources, strict=True)]

    def decode(self, indices: Iterable[int]) -> list[str]:
        vocab = self._fitted()
        return [vocab.decode(int(i)) for i in indices]

    def to_json(self) -> dict:
        return {**self._fitted().to_json(), "unseen": self.unseen, "other_name": self.other_name}

    @classmethod
    def from_json(cls, data: dict) -> CategoryProcessor:
        """Load, refusing a vocab whose fingerprint disagrees with its names."""
        return cls(
            unseen=data.get("unseen", "error"),
            other_name=data.get("other_name", "other"),
            vocab=Vocab.from_json(data),
        )

    def save(self, path: str | Path) -> None:
        """JSON with `vocab`, `vocab_fingerprint`, `unseen`, `other_name`, written atomically."""
        atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CategoryProcessor:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def __repr__(self) -> str:
        names = None if self.vocab is None else self.vocab.names
        return f"CategoryProcessor(unseen={self.unseen!r}, vocab={names!r})"
