"""`tench interpret RUN_DIR --shards SHARDS --out DIR`: where the model goes wrong, fastai style.

Predicts a split as `tench predict` does (`trainer.inference`: the actors, the validation
transforms, the run's device) and writes into DIR:

    confusion.png   the labelled confusion matrix (rows: label, columns: prediction)
    top_losses.png  the k highest-loss images, as the model saw them (after the validation
                    transforms, before normalisation), with label, prediction, loss, probability
    per_class.csv   class,precision,recall,count (count: samples with that label; precision
                    is empty for a class never predicted)

and prints the most confused (label, prediction) pairs, as fastai's `most_confused`.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import io
import itertools
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.source import ShardReadError, ShardSource
from shards.atomic import atomic_write_text
from trainer.callbacks.recorder import new_figure, save_figure
from trainer.inference import (
    InferenceError,
    check_vocab,
    load_predictor,
    split_stream,
    stream_probabilities,
)
from trainer.run_dir import ModelFileError

CONFUSION_NAME = "confusion.png"
TOP_LOSSES_NAME = "top_losses.png"
PER_CLASS_NAME = "per_class.csv"
ANNOTATE_MAX_CLASSES = 30  # above this the counts in the cells would not be readable


@dataclass(frozen=True)
class TopLoss:
    loss: float
    image: np.ndarray  # (H, W, 3) uint8, as the model saw it (un-normalised)
    label: int
    prediction: int
    probability: float  # of the prediction
    key: str


@dataclass
class Interpretation:
    """Per-sample labels, predictions and losses of one pass, and the k worst samples."""

    vocab: list[str]
    labels: list[int] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    top: list[TopLoss] = field(default_factory=list)  # highest loss first

    @property
    def accuracy(self) -> float:
        return float(np.mean(np.array(self.labels) == np.array(self.predictions)))

    def confusion(self) -> np.ndarray:
        """(n, n) counts: row = label, column = prediction."""
        n = len(self.vocab)
        matrix = np.zeros((n, n), np.int64)
        np.add.at(matrix, (np.array(self.labels, int), np.array(self.predictions, int)), 1)
        return matrix


def interpret(vocab: list[str], results: Iterable[tuple[Batch, torch.Tensor]], k: int = 9
              ) -> Interpretation:
    """Collect (batch, probabilities) pairs; keeps only the `k` highest-loss images."""
    out = Interpretation(list(vocab))
    heap: list = []  # (loss, order, TopLoss): the k largest so far, smallest on top
    order = itertools.count()
    for batch, probs in results:
        labels = batch.labels
        losses = -probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12).log()
        best, predicted = probs.max(dim=1)
        out.labels += labels.tolist()
        out.predictions += predicted.tolist()
        out.losses += losses.tolist()
        for i in losses.argsort(descending=True)[:k].tolist():
            loss = float(losses[i])
            if len(heap) == k and loss <= heap[0][0]:
                break
            item = TopLoss(loss, batch.images[i].permute(1, 2, 0).numpy().copy(),
                           int(labels[i]), int(predicted[i]), float(best[i]), batch.keys[i])
            entry = (loss, -next(order), item)  # ties: the earlier sample ranks first
            if len(heap) < k:
                heapq.heappush(heap, entry)
            else:
                heapq.heapreplace(heap, entry)
    out.top = [item for *_, item in sorted(heap, key=lambda e: (e[0], e[1]), reverse=True)]
    return out


def most_confused(matrix: np.ndarray, vocab: list[str], min_count: int = 1
                  ) -> list[tuple[str, str, int]]:
    """(label, prediction, count) off the diagonal, most frequent first (fastai's order)."""
    pairs = [(vocab[a], vocab[p], int(matrix[a, p])) for a in range(len(vocab))
             for p in range(len(vocab)) if a != p and matrix[a, p] >= min_count]
    return sorted(pairs, key=lambda pair: -pair[2])


def per_class_csv(matrix: np.ndarray, vocab: list[str]) -> str:
    """class,precision,recall,count; precision empty for a class never predicted, recall
    empty for one with no samples."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "precision", "recall", "count"])
    predicted, counts = matrix.sum(axis=0), matrix.sum(axis=1)
    for i, name in enumerate(vocab):
        hits = matrix[i, i]
        precision = f"{hits / predicted[i]:.6f}" if predicted[i] else ""
        recall = f"{hits / counts[i]:.6f}" if counts[i] else ""
        writer.writerow([name, precision, recall, int(counts[i])])
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots
def plot_confusion(matrix: np.ndarray, vocab: list[str], path: Path, title: str) -> Path:
    n = len(vocab)
    side = min(max(5.0, 0.5 * n + 2.5), 40.0)
    fig, [ax] = new_figure(1, side, side)
    ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.set_xticks(range(n), vocab, rotation=90 if n > 6 else 45, ha="center" if n > 6 else "right")
    ax.set_yticks(range(n), vocab)
    ax.set_xlabel("prediction")
    ax.set_ylabel("label")
    ax.set_title(title)
    if n <= ANNOTATE_MAX_CLASSES:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(col, row, str(count), ha="center", va="center",
                    color="white" if count > threshold else "black")
    return save_figure(fig, path)


def plot_top_losses(top: list[TopLoss], vocab: list[str], path: Path) -> Path:
    """A grid of the highest-loss images titled label / prediction / loss / probability."""
    cols = max(1, math.ceil(math.sqrt(len(top))))
    rows = max(1, math.ceil(len(top) / cols))
    fig, _ = new_figure(1, 3.2 * cols, 3.4 * rows + 0.5)
    fig.clear()
    fig.suptitle("top losses: label / prediction / loss / probability of the prediction")
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < len(top):
            t = top[i]
            ax.imshow(t.image, interpolation="nearest")  # the model's pixels, not smoothed
            ax.set_title(f"{vocab[t.label]} / {vocab[t.prediction]}\n"
                         f"loss {t.loss:.2f} / p {t.probability:.2f}", fontsize=10)
    return save_figure(fig, path)


def write_interpretation(result: Interpretation, out_dir: Path, split: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = result.confusion()
    title = (f"{split}: {len(result.labels)} images, accuracy {result.accuracy:.1%}")
    atomic_write_text(out_dir / PER_CLASS_NAME, per_class_csv(matrix, result.vocab))
    return [plot_confusion(matrix, result.vocab, out_dir / CONFUSION_NAME, title),
            plot_top_losses(result.top, result.vocab, out_dir / TOP_LOSSES_NAME),
            out_dir / PER_CLASS_NAME]


# ----------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a `tench fit` run folder")
    parser.add_argument("--shards", required=True, metavar="SHARDS",
                        help="shards folder or URL (made by the same `tench shard` run)")
    parser.add_argument("--split", default="valid", help="the split to look at (default valid)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for confusion.png, top_losses.png, per_class.csv")
    parser.add_argument("--top-losses", type=int, default=9, metavar="K",
                        help="images in top_losses.png (default 9)")
    parser.add_argument("--most-confused", type=int, default=20, metavar="N",
                        help="pairs to print (default 20)")
    parser.add_argument("--tta", action="store_true", help="average the crop and its flip")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--actors", type=int, metavar="N",
                        help="Ray actors decoding the shards (default: one per core)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA if present)")


def main(args: argparse.Namespace) -> int:
    if args.top_losses < 1 or args.batch_size < 1:
        print("tench interpret: --top-losses and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        predictor = load_predictor(args.run_dir, args.device, tta=args.tta)
        source = ShardSource.of(args.shards)
        check_vocab(predictor, source, args.run_dir)
        with split_stream(predictor, source, args.split, args.batch_size, args.actors) as stream:
            result = interpret(predictor.vocab, stream_probabilities(predictor, stream),
                               args.top_losses)
    except (ModelFileError, InferenceError, ShardReadError, FileNotFoundError, ValueError) as e:
        print(f"tench interpret: {e}", file=sys.stderr)
        return 2
    written = write_interpretation(result, args.out, args.split)
    pairs = most_confused(result.confusion(), result.vocab)
    print(f"{len(result.labels)} {args.split} images, accuracy {result.accuracy:.2%}")
    print("most confused (label -> prediction: count):" if pairs else "no confusions")
    for label, prediction, count in pairs[:args.most_confused]:
        print(f"  {label} -> {prediction}: {count}")
    if len(pairs) > args.most_confused:
        print(f"  ... and {len(pairs) - args.most_confused} more pairs")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
