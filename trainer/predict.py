"""`tench predict RUN_DIR IMAGE...`: class and probability of image files with a trained run.

Reads the run's model (`trainer.run_dir.load_model`, weights only), decodes each image as
the validation stream does (`pipeline.decode` + the validation transforms), normalises it
as training did (`trainer.callbacks.device.Normalize`, the shards' mean/std) and prints
`path<TAB>class<TAB>probability`, one line per image.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.decode import DecodeError, decode_image
from pipeline.transforms import VALID_ZOOM, valid_tfms
from trainer.callbacks.device import Normalize
from trainer.run_dir import ModelFileError, load_model


class PredictError(ValueError):
    """A model file or image that cannot be used; the message names it."""


@dataclass(frozen=True)
class Predictor:
    """A trained model with what it needs to turn an image file into a prediction."""

    model: torch.nn.Module
    vocab: list[str]
    normalize: Normalize  # the shards' mean/std, as in training
    size: int

    def image_tensor(self, path: str | Path) -> torch.Tensor:
        """(3, size, size) uint8, as the validation stream would deliver it."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PredictError(f"{path}: cannot read ({e.strerror or e})") from e
        try:
            image = decode_image(data, path.suffix.lstrip(".").lower(),
                                 target_size=round(self.size * VALID_ZOOM), source=str(path))
            image = valid_tfms(self.size)(image, np.random.default_rng(0))  # no randomness
        except (DecodeError, ValueError) as e:
            raise PredictError(f"{path}: not a usable image ({e})") from e
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, n_classes) softmax probabilities."""
        x = self.normalize(images)
        return self.model(x).float().softmax(dim=1)


def load_predictor(run_dir: str | Path) -> Predictor:
    """The run's model.pt, ready to predict; raises ModelFileError naming the file."""
    trained = load_model(run_dir)
    return Predictor(trained.model, trained.vocab, Normalize.from_stats(trained.stats),
                     trained.size)


def predict_files(predictor: Predictor, paths: list[str | Path]) -> list[tuple[str, str, float]]:
    """(path, class, probability) per file; raises PredictError naming the first bad one."""
    images = torch.stack([predictor.image_tensor(p) for p in paths])
    probs = predictor.probabilities(images)
    best, index = probs.max(dim=1)
    return [(str(p), predictor.vocab[i], float(b))
            for p, i, b in zip(paths, index.tolist(), best.tolist(), strict=True)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a `tench fit` run folder")
    parser.add_argument("images", metavar="IMAGE", nargs="+", type=Path, help="image files")


def main(args: argparse.Namespace) -> int:
    try:
        predictor = load_predictor(args.run_dir)
    except ModelFileError as e:
        print(f"tench predict: {e}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.images:  # one at a time: a bad file is reported, the rest still predicted
        try:
            [(name, label, prob)] = predict_files(predictor, [path])
        except PredictError as e:
            print(f"tench predict: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}\t{label}\t{prob:.4f}", flush=True)
    if failed:
        print(f"tench predict: {failed} of {len(args.images)} images could not be read",
              file=sys.stderr)
        return 1
    return 0
