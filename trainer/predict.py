"""`tench predict RUN_DIR IMAGE...` / `tench predict RUN_DIR --shards SHARDS --out preds.csv`.

Image files (or folders of them) print `path<TAB>class<TAB>probability`, one line per image;
a file that cannot be read or decoded gets its own line on stderr and the rest are still
predicted. A split of a shards folder is streamed through `ShardStream`'s actors with the
validation transforms (`trainer.inference`) and written as CSV, one row per sample:
`key,path,label,prediction,probability` plus `top1,top1_probability,...` with `--top-k K`.
The accuracy of that CSV is the run's validation accuracy (same model, same transforms).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from pipeline.source import ShardReadError, ShardSource
from shards.atomic import atomic_open
from trainer.inference import (
    FileResult,
    InferenceError,
    Predictor,
    check_vocab,
    expand_image_paths,
    load_predictor,
    predict_files,
    split_stream,
    start_sample_info,
    stream_probabilities,
)
from trainer.run_dir import ModelFileError

__all__ = ["load_predictor", "predict_shards", "csv_columns", "main"]

BASE_COLUMNS = ("key", "path", "label", "prediction", "probability")


def csv_columns(top_k: int = 0) -> list[str]:
    top = [name for i in range(1, top_k + 1) for name in (f"top{i}", f"top{i}_probability")]
    return [*BASE_COLUMNS, *top]


def csv_row(vocab: list[str], probs: torch.Tensor, top_k: int, key: str = "", path: str = "",
            label: str = "") -> list:
    """One CSV row for one sample's probabilities."""
    prob, index = probs.max(dim=0)
    row = [key, path, label, vocab[int(index)], f"{float(prob):.6f}"]
    if top_k:
        values, indices = probs.topk(min(top_k, len(vocab)))
        for value, i in zip(values.tolist(), indices.tolist(), strict=True):
            row += [vocab[i], f"{value:.6f}"]
        row += [""] * (2 * top_k - (len(row) - len(BASE_COLUMNS)))  # K > classes
    return row


@dataclass(frozen=True)
class PredictSummary:
    rows: int
    labelled: int  # rows with a label
    correct: int  # labelled rows whose prediction is the label

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def predict_shards(predictor: Predictor, shards: str | Path, out: TextIO, split: str = "valid",
                   top_k: int = 0, batch_size: int = 64, actors: int | None = None,
                   run_dir: str | Path = "") -> PredictSummary:
    """Write one CSV row per sample of `split` to `out`; refuses shards of another vocab."""
    source = ShardSource.of(shards)
    meta = check_vocab(predictor, source, run_dir)
    if split not in meta["splits"]:
        raise InferenceError(f"{source.url_of('meta.json')}: no split {split!r}; it has "
                             f"{sorted(meta['splits'])}")
    info_future = start_sample_info(source, meta["splits"][split])
    rows: list[list] = []  # small per sample; the images are dropped batch by batch
    with split_stream(predictor, source, split, batch_size, actors) as stream:
        for batch, probs in stream_probabilities(predictor, stream):
            for key, label_index, sample_probs in zip(batch.keys, batch.labels.tolist(), probs,
                                                      strict=True):
                rows.append(csv_row(predictor.vocab, sample_probs, top_k, key,
                                    label=predictor.vocab[label_index]))
    info = info_future.result()  # read beside the stream; paths are filled in now
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_columns(top_k))
    labelled = correct = 0
    for row in rows:
        sample = info.get(row[0])
        if sample is not None:
            row[1] = sample.path
            if sample.label is None:  # the shards record no label for it
                row[2] = ""
        if row[2]:
            labelled += 1
            correct += row[3] == row[2]
        writer.writerow(row)
    return PredictSummary(len(rows), labelled, correct)


# ----------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a `tench fit` run folder")
    parser.add_argument("images", metavar="IMAGE", nargs="*", type=Path,
                        help="image files or folders of images")
    parser.add_argument("--shards", metavar="SHARDS",
                        help="predict a split of this shards folder or URL instead")
    parser.add_argument("--split", default="valid", help="the split of --shards (default valid)")
    parser.add_argument("--out", metavar="CSV", type=Path,
                        help="write CSV here (needed with --shards; images print to stdout)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="add the K most probable classes as columns top1, "
                             "top1_probability, ...")
    parser.add_argument("--tta", action="store_true",
                        help="average the centre crop's and its flip's probabilities")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--actors", type=int, metavar="N",
                        help="Ray actors decoding the shards (default: one per core)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA if present)")


def fail(message: str, code: int = 2) -> int:
    print(f"tench predict: {message}", file=sys.stderr)
    return code


@contextlib.contextmanager
def open_out(path: Path | None) -> Iterator[TextIO]:
    """The CSV file (written atomically), or stdout for None / `-`."""
    if path is None or str(path) == "-":
        yield sys.stdout
        return
    with atomic_open(path, "w") as f:
        yield f


def main(args: argparse.Namespace) -> int:
    if bool(args.images) == bool(args.shards):
        return fail("give image files or folders, or --shards SHARDS (not both)")
    if args.top_k < 0 or args.batch_size < 1:
        return fail("--top-k must be >= 0 and --batch-size >= 1")
    if args.shards and args.out is None:
        return fail("--shards needs --out FILE.csv (or --out - for stdout)")
    try:
        predictor = load_predictor(args.run_dir, args.device, tta=args.tta)
    except ModelFileError as e:
        return fail(str(e))
    if args.shards:
        try:
            with open_out(args.out) as out:
                summary = predict_shards(predictor, args.shards, out, args.split, args.top_k,
                                         args.batch_size, args.actors, args.run_dir)
        except (InferenceError, ShardReadError, FileNotFoundError, ValueError) as e:
            return fail(str(e))
        accuracy = "" if summary.accuracy is None else f", accuracy {summary.accuracy:.2%}"
        print(f"{summary.rows} {args.split} samples predicted{accuracy}; CSV in {args.out}",
              file=sys.stderr if args.out is None or str(args.out) == "-" else sys.stdout)
        return 0
    return predict_images(predictor, args)


def predict_images(predictor: Predictor, args: argparse.Namespace) -> int:
    try:
        paths = expand_image_paths(args.images)
    except OSError as e:
        return fail(str(e))
    if not paths:
        return fail(f"no image files in {', '.join(map(str, args.images))}")
    failed = 0
    with open_out(args.out) as out:
        writer = csv.writer(out, lineterminator="\n") if args.out else None
        if writer:
            writer.writerow(csv_columns(args.top_k))
        for result in predict_files(predictor, paths, args.batch_size):
            failed += not report(predictor, result, writer, args.top_k)
    if failed:
        return fail(f"{failed} of {len(paths)} images could not be read", 1)
    return 0


def report(predictor: Predictor, result: FileResult, writer, top_k: int) -> bool:
    """Print or write one file's result; False (and a line on stderr) for a bad file."""
    if result.probs is None:
        print(f"tench predict: {result.error}", file=sys.stderr)
        return False
    row = csv_row(predictor.vocab, result.probs, top_k, path=str(result.path))
    if writer is not None:
        writer.writerow(row)
    else:
        print("\t".join([str(result.path), row[3], f"{float(row[4]):.4f}"]), flush=True)
    return True
