"""`tench shard SRC OUT`: labelled images -> webdataset tar shards + meta.json.

A thin command over the Data Block API: `shard_folder` runs

    ImageList.from_files(SRC).split(splitter).label(labeler).to_shards(OUT)

(`ImageList.from_csv(SRC, CSV)` with --labels-csv), the splitter and labeler picked by
the flags, and turns every error into a `ShardError` saying what to change:

    labels: the parent folder (default) | --label-regex PATTERN | --labels-csv FILE
    split:  SRC/train/ and SRC/val/ (default) | --valid-pct P | --split-csv-column COLUMN

The work itself (plan, parallel check-and-write, meta.json) is `shards.shard_run`.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from shards.blocks import (
    CategoryProcessor,
    Labeler,
    LabelError,
    Splitter,
    parent_labeler,
    random_splitter,
    regex_labeler,
    top_folder_splitter,
)
from shards.files import relative_path
from shards.items import ImageList, LabeledData
from shards.labels_csv import LabelsCsv, csv_splitter
from shards.remote import is_url
from shards.shard_plan import STATS_IMAGES, ShardError, relative
from shards.shard_run import ON_ERROR, check_options, check_out
from shards.vocab import Vocab, read_vocab

OUTSIDE = "outside the layout"  # the reason meta.json gives for a file the split left out

EPILOG = """\
labels (one of):
  default             the file's folder: SRC/train/<label>/x.jpg or, with --valid-pct,
                      SRC/<label>/x.jpg; files anywhere else are skipped and reported
  --label-regex P     one (...) group of P searched in the file name; a name it does not
                      match is an error. Oxford-IIIT Pets: --label-regex '^(.+)_\\d+\\.jpg$'
  --labels-csv FILE   rows 'path,label', path relative to SRC, header row optional (needed
                      for more columns); a row naming a missing file is an error; image
                      files under SRC that no row names are skipped and reported
split (one of):
  default             SRC/train/... trains, SRC/val/... (or valid/) validates
  --valid-pct P       a fraction P of the files at random, by --seed (same seed, same split)
  --split-csv-column COLUMN
                      a column of the labels CSV: train or valid (val), or a boolean as in
                      fastai's is_valid (true/1: validation)

In Python: ImageList.from_files(SRC).split(splitter).label(labeler).to_shards(OUT)."""


def shard_folder(
    src: str | Path, out: str | Path, *, valid_pct: float | None = None, seed: int = 0,
    label_regex: str | None = None, labels_csv: str | Path | None = None,
    split_csv_column: str | None = None, shard_size: int | None = None,
    max_count: int | None = None, max_size: int | None = None, processes: int | None = None,
    on_error: str = "skip", force: bool = False, progress: bool = True,
    max_pixels: int | None = None, stats_images: int = STATS_IMAGES,
    vocab_from: str | Path | None = None,
) -> dict:  # fmt: skip
    """Shard the images under `src` into `out`, labelled and split as `tench shard`'s flags
    say (see EPILOG); return the `meta.json` object written. Raises `ShardError`.

    `seed` picks both the random split and the shuffle. `vocab_from`: a shards folder/URL
    or vocab JSON whose vocab labels these images (a label it lacks is an error naming it
    and a file). The rest: see `shards.shard_run.shard_data`.
    """
    src, out = Path(src), (out if is_url(out) else Path(out))
    if valid_pct is not None and not 0.0 < valid_pct < 1.0:
        raise ShardError(f"--valid-pct must be between 0 and 1 (a fraction), got {valid_pct}")
    check_options(shard_size=shard_size, max_count=max_count, max_size=max_size,
                  processes=processes, on_error=on_error, max_pixels=max_pixels)  # fmt: skip
    check_src(src)
    if not is_url(out):  # object storage: checked when the run starts (shards.bucket)
        check_out(out, src, force)  # before listing SRC: a mistyped OUT fails at once
    try:
        vocab = None if vocab_from is None else read_vocab(vocab_from)
    except ValueError as e:
        raise ShardError(f"--vocab-from: {e}") from None
    data, layout = folder_data(src, valid_pct=valid_pct, seed=seed, label_regex=label_regex,
                               labels_csv=labels_csv, split_csv_column=split_csv_column,
                               vocab=vocab)
    options: dict[str, Any] = {"valid_pct": valid_pct}
    for name, value in (("label_regex", label_regex), ("labels_csv", labels_csv),
                        ("split_csv_column", split_csv_column),
                        ("vocab_from", vocab_from)):  # fmt: skip
        if value is not None:  # only when used, so meta.json of a folder run stays the same
            options[name] = str(value)
    return data.to_shards(
        out, seed=seed, shard_size=shard_size, max_count=max_count, max_size=max_size,
        processes=processes, on_error=on_error, force=force, progress=progress,
        max_pixels=max_pixels, stats_images=stats_images, layout=layout, options=options,
    )  # fmt: skip


def folder_data(
    src: Path, *, valid_pct: float | None = None, seed: int = 0, label_regex: str | None = None,
    labels_csv: str | Path | None = None, split_csv_column: str | None = None,
    vocab: Vocab | None = None,
) -> tuple[LabeledData, str]:  # fmt: skip
    """The labelled files `tench shard` would write, and the layout name for meta.json.

    `vocab`: label with it as given (else it is learnt from the training labels)."""
    if label_regex is not None and labels_csv is not None:
        raise ShardError("--label-regex and --labels-csv both give the labels; pass one")
    if split_csv_column is not None and labels_csv is None:
        raise ShardError("--split-csv-column names a column of --labels-csv; pass that too")
    if split_csv_column is not None and valid_pct is not None:
        raise ShardError("--valid-pct and --split-csv-column both give the split; pass one")
    by_folder = label_regex is None and labels_csv is None
    layout = choose_layout(src, valid_pct, split_csv_column, by_folder, labels_csv is not None)
    try:
        labels = None if labels_csv is None else LabelsCsv(labels_csv, src)
        labeler: Labeler = parent_labeler
        if label_regex is not None:
            labeler = _regex(label_regex)
        if labels is None:
            items = ImageList.from_files(src)
            if not items.items and not items.skipped:
                raise ShardError(f"{src}: SRC holds no files (hidden files are ignored)")
        else:
            labeler = labels
            if not len(labels):
                raise ShardError(f"{labels_csv}: no rows; expected 'path,label' rows")
            items = ImageList.from_csv(src, labels)
        splitter, where = _splitter(layout, src, valid_pct, seed, by_folder, labels,
                                    split_csv_column)  # fmt: skip
        split = items.split(splitter, left_out=f"{OUTSIDE}: not in {where}")
        if not split.train.items:
            left_out = sorted((relative(p, src) for p, _ in split.skipped), key=Path)
            raise ShardError(
                f"{src}: no training images (files with an image extension in {where}); "
                f"{len(left_out)} files left out, e.g. {left_out[0] if left_out else '-'}"
            )
        processor = None if vocab is None else CategoryProcessor(vocab=vocab)
        return split.label(labeler, processor), layout
    except LabelError as e:
        raise ShardError(str(e)) from None


def check_src(src: Path) -> None:
    if not src.exists():
        raise ShardError(f"{src}: SRC does not exist")
    if not src.is_dir():
        raise ShardError(f"{src}: SRC is a file; expected a folder of images")


def choose_layout(src: Path, valid_pct: float | None, split_csv_column: str | None,
                  by_folder: bool, has_csv: bool) -> str:  # fmt: skip
    """How to split: "imagenet" (train/ and val/ folders), "flat" (random) or "csv"."""
    if split_csv_column is not None:
        return "csv"
    has_train = (src / "train").is_dir()
    has_valid = (src / "val").is_dir() or (src / "valid").is_dir()
    if valid_pct is None:
        if not has_train:
            csv_hint = ", or --split-csv-column COLUMN to split by the CSV" if has_csv else ""
            raise ShardError(
                f"{src}: no train/ folder; for the ImageNet layout put images in "
                "train/<class>/ and val/<class>/, or for a flat tree of class folders pass "
                f"--valid-pct P (e.g. 0.2){csv_hint}"
            )
        return "imagenet"
    if by_folder and has_train and has_valid:
        raise ShardError(
            f"{src}: has train/ and val/ folders (ImageNet layout), which --valid-pct would "
            "treat as two classes; drop --valid-pct"
        )
    return "flat"


def _regex(pattern: str) -> Labeler:
    try:
        return regex_labeler(pattern)
    except re.error as e:
        raise ShardError(f"--label-regex {pattern!r} is not a regular expression: {e}") from None
    except ValueError as e:
        raise ShardError(f"--label-regex: {e}") from None


def _splitter(layout: str, src: Path, valid_pct: float | None, seed: int, by_folder: bool,
              labels: LabelsCsv | None, column: str | None) -> tuple[Splitter, str]:  # fmt: skip
    """The splitter for `layout` and where it takes files from (for messages).

    With folder labels a file must sit in a class folder at the layout's class level
    (SRC/train/<class>/x.jpg, or SRC/<class>/x.jpg with --valid-pct); others are left out.
    """
    if layout == "csv":
        return csv_splitter(labels, column), f"{labels.csv_path} with a {column!r} value"
    if layout == "imagenet":
        splitter = top_folder_splitter(src)
        if not by_folder:
            return splitter, "train/, val/ or valid/"
        return _at_depth(splitter, src, 3), "a class folder directly under train/ or val/"
    splitter = random_splitter(valid_pct, seed, root=src)
    if not by_folder:
        return splitter, "SRC"
    return _at_depth(splitter, src, 2), "a class folder directly under SRC"


def _at_depth(splitter: Splitter, root: Path, depth: int) -> Splitter:
    """`splitter` for files `depth` path parts below `root`; None for any other file."""

    def split(path: Path) -> str | None:
        return splitter(path) if relative_path(path, root).count("/") == depth - 1 else None

    return split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("src", metavar="SRC", type=Path,
                        help="the image folder: train/<class>/ + val/<class>/ (ImageNet "
                             "layout), or any tree with the flags below")  # fmt: skip
    parser.add_argument("out", metavar="OUT",
                        help="folder for the shards and meta.json, or s3://bucket/prefix "
                             "(standard AWS settings: AWS_ENDPOINT_URL, AWS_PROFILE, ...)")
    parser.add_argument("--label-regex", metavar="PATTERN", default=None,
                        help="label = the one (...) group of PATTERN in the file name")
    parser.add_argument("--labels-csv", metavar="FILE", type=Path, default=None,
                        help="label = the CSV's label for the file: rows 'path,label', path "
                             "relative to SRC; files it does not name are skipped")  # fmt: skip
    parser.add_argument("--valid-pct", type=float, default=None,
                        help="split at random: the fraction of files (e.g. 0.2, drawn by "
                             "--seed) that go to validation")  # fmt: skip
    parser.add_argument("--split-csv-column", metavar="COLUMN", default=None,
                        help="split by this column of --labels-csv (train/valid, or "
                             "true/false as in fastai's is_valid)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="bytes per shard (default 256 MB, smaller for small sets)")
    parser.add_argument("--max-count", type=int, default=None, help="images per shard at most")
    parser.add_argument("--max-size", type=int, default=None, metavar="PX",
                        help="shrink so the shorter side is at most PX and re-encode "
                             "(default: keep the original bytes)")  # fmt: skip
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="skip images with more pixels (default Pillow's bomb limit)")
    parser.add_argument("--processes", type=int, default=None,
                        help="sharder processes that read, check and write shards (default: "
                             "all cores)")  # fmt: skip
    parser.add_argument("--on-error", choices=ON_ERROR, default="skip",
                        help="a file that is not a usable image: skip it and report it (default) "
                             "or stop the run")  # fmt: skip
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier run's shards in OUT (and its leftover temp files)")
    parser.add_argument("--vocab-from", metavar="OTHER", default=None,
                        help="label with OTHER's vocab (a shards folder or URL, or a vocab "
                             "JSON), so the two sets can be streamed together")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error, not just its sentence")


def main(args: argparse.Namespace) -> int:
    try:
        shard_folder(
            args.src, args.out, valid_pct=args.valid_pct, seed=args.seed,
            label_regex=args.label_regex, labels_csv=args.labels_csv,
            split_csv_column=args.split_csv_column, shard_size=args.shard_size,
            max_count=args.max_count, max_size=args.max_size, processes=args.processes,
            on_error=args.on_error, force=args.force, max_pixels=args.max_pixels,
            vocab_from=args.vocab_from,
        )  # fmt: skip
    except (ShardError, OSError) as e:  # OSError: one no check foresaw (a disk error, ...)
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"tench shard: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # `python -m shards.sharder SRC OUT`, same as `tench shard`
    _parser = argparse.ArgumentParser(prog="tench shard", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
