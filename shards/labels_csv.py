"""A labels CSV: the files under a folder, their labels and, optionally, their split.

Kaggle-style data sets ship a CSV instead of class folders. Its rows are `path,label`,
the path relative to the image folder with `/` on every system. A header row is
optional for two columns; with a header, columns are found by name (`path` and `label`,
any case) and more may follow, such as fastai's `is_valid` or a `split` column naming
each file's split. The whole CSV is read and checked up front, so a bad row is an error
naming its line before any image is read, not halfway through a run.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

from shards.blocks import LabelError, Splitter
from shards.format import TRAIN, VALID

# a split column's values (any case) -> the split; fastai's `is_valid` booleans included
SPLIT_VALUES = {
    "train": TRAIN, "training": TRAIN, "false": TRAIN, "0": TRAIN,
    "valid": VALID, "val": VALID, "validation": VALID, "true": VALID, "1": VALID,
}  # fmt: skip


class LabelsCsv:
    """The rows of a labels CSV, by path relative to `root`; called on a path, its label.

    `labels(root / "a/1.jpg")` is the label of row `a/1.jpg`. A row that repeats a path
    with other values, has the wrong number of cells, or a path leaving `root` is an
    error naming the CSV line.
    """

    def __init__(self, csv_path: str | Path, root: str | Path):
        self.csv_path = Path(csv_path)
        self.root = os.path.abspath(root)
        self.header: list[str] | None = None  # lower-cased column names, if the CSV has them
        self.rows: dict[str, tuple[int, list[str]]] = {}  # path -> (line number, cells)
        path_col, self.label_col = 0, 1
        try:
            f = open(self.csv_path, newline="", encoding="utf-8-sig")  # -sig: Excel's BOM
        except OSError as e:
            raise LabelError(f"{self.csv_path}: cannot read labels CSV ({e.strerror})") from None
        with f:
            for line_no, row in enumerate(csv.reader(f), start=1):
                cells = [cell.strip() for cell in row]
                if not any(cells):
                    continue
                if line_no == 1 and {"path", "label"} <= {c.lower() for c in cells}:
                    self.header = [c.lower() for c in cells]
                    path_col = self.header.index("path")
                    self.label_col = self.header.index("label")
                    continue
                width = 2 if self.header is None else len(self.header)
                expected = "path,label" if self.header is None else ",".join(self.header)
                if len(cells) != width or not cells[path_col] or not cells[self.label_col]:
                    raise LabelError(f"{self._where(line_no)}: expected '{expected}', got {row!r}")
                rel = cells[path_col] = _csv_key(cells[path_col], self._where(line_no))
                if rel in self.rows and self.rows[rel][1] != cells:
                    first, before = self.rows[rel]
                    label, other = before[self.label_col], cells[self.label_col]
                    what = (f"labelled both {label!r} and {other!r}" if label != other
                            else f"listed with other values on line {first}")
                    raise LabelError(f"{self._where(line_no)}: {rel!r} {what}")
                self.rows.setdefault(rel, (line_no, cells))

    def _where(self, line_no: int) -> str:
        return f"{self.csv_path}:{line_no}"

    def key(self, path: str | Path) -> str:
        """The CSV's spelling of `path`: relative to root, with `/`."""
        return _csv_key(os.path.relpath(os.path.abspath(path), self.root))

    def check_files(self) -> None:
        """A row naming a file that does not exist is an error naming the row and the path."""
        missing = [(line, rel) for rel, (line, _) in self.rows.items()
                   if not os.path.lexists(os.path.join(self.root, rel))]  # fmt: skip
        if missing:
            line, rel = missing[0]
            more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
            raise LabelError(
                f"{self._where(line)}: {rel!r} does not exist under {self.root}{more}; "
                "paths in a labels CSV are relative to the image folder"
            )

    def __call__(self, path: str | Path) -> str:
        rel = self.key(path)
        try:
            return self.rows[rel][1][self.label_col]
        except KeyError:
            raise LabelError(
                f"{path}: not listed in {self.csv_path} (looked for {rel!r} relative to "
                f"{self.root})"
            ) from None

    def column(self, name: str) -> dict[str, str]:
        """{path: value} of the column called `name` (any case); the CSV needs a header."""
        if self.header is None:
            raise LabelError(
                f"{self.csv_path}: no header row, so no column {name!r}; start the CSV with "
                f"a header such as 'path,label,{name}'"
            )
        if name.lower() not in self.header:
            raise LabelError(f"{self.csv_path}: no column {name!r}; the columns are "
                             f"{','.join(self.header)}")  # fmt: skip
        at = self.header.index(name.lower())
        return {rel: cells[at] for rel, (_, cells) in self.rows.items()}

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"LabelsCsv({str(self.csv_path)!r}, {len(self.rows)} rows)"


def _csv_key(rel: str, where: str = "") -> str:
    key = PurePosixPath(rel.replace("\\", "/")).as_posix().removeprefix("./")
    if where and (key.startswith("/") or ".." in PurePosixPath(key).parts):
        raise LabelError(f"{where}: {rel!r} is not a path inside the image folder")
    return key


def csv_labeler(csv_path: str | Path, root: str | Path) -> LabelsCsv:
    """Labels from a CSV of `path,label` relative to `root` (see `LabelsCsv`)."""
    return LabelsCsv(csv_path, root)


def csv_splitter(labels: LabelsCsv, column: str) -> Splitter:
    """Split by a column of the labels CSV: `train` or `valid`/`val` in each row, or as
    fastai's `is_valid` column, a boolean (true/1: validation). Files the CSV does not
    list are left out (None). Every value is checked now; a bad one names its line.
    """
    splits = {}
    for rel, value in labels.column(column).items():
        split = SPLIT_VALUES.get(value.lower())
        if split is None:
            raise LabelError(
                f"{labels.csv_path}:{labels.rows[rel][0]}: column {column!r} is {value!r}; "
                "expected train or valid (or, as fastai's is_valid, true/false)"
            )
        splits[rel] = split

    def split(path: str | Path) -> str | None:
        return splits.get(labels.key(path))

    return split
