"""`tench export RUN_DIR --out model.pt2`: a model anyone can load with plain torch.

The file is a `torch.export` program of the run's eval model wrapped so that it takes
raw pixels, `(B, 3, size, size)` uint8 RGB, and does the float conversion and the shards'
normalisation inside (the same arithmetic as `trainer.callbacks.device.Normalize`); it
returns logits. Beside it, `model.json` carries what the program cannot: the vocab (class
index -> name), the input size and how to get there (shorter side to `resize`, centre crop
to `size`, as the validation stream does), mean/std and a format version. Loading needs
`torch.export.load` only; no tench, no pickle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from pipeline.transforms import VALID_ZOOM
from shards.atomic import atomic_open, atomic_write_text
from shards.vocab import Vocab
from trainer.run_dir import ModelFileError, load_model

EXPORT_FORMAT_VERSION = 1
MAX_BATCH = 4096  # the exported program accepts any batch size from 1 to this


class RawImageClassifier(nn.Module):
    """uint8 `(B, 3, H, W)` RGB images -> `(B, n_classes)` logits, normalising inside."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        # the same constants and operations as Normalize: (x - 255 mean) / (255 std)
        self.register_buffer("shift", torch.tensor([m * 255.0 for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("scale", torch.tensor([s * 255.0 for s in std]).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.shift) / self.scale)


def json_path(out: str | Path) -> Path:
    """`model.pt2` -> `model.json`, beside it."""
    return Path(out).with_suffix(".json")


def export_run(run_dir: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write the exported program to `out` and its JSON beside it; returns both paths."""
    out = Path(out)
    if out.suffix == ".json":
        raise ValueError(f"{out}: give the program's file name (model.pt2); the JSON goes "
                         "beside it")
    trained = load_model(run_dir)
    wrapped = RawImageClassifier(trained.model, trained.stats["mean"], trained.stats["std"])
    wrapped.eval()
    example = torch.randint(0, 256, (2, 3, trained.size, trained.size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        torch.export.save(program, f)
    info = {
        "format_version": EXPORT_FORMAT_VERSION,
        "program": out.name,
        "arch": trained.arch,
        "vocab": trained.vocab,
        "vocab_fingerprint": Vocab(trained.vocab).fingerprint,
        "size": trained.size,
        "resize": round(trained.size * VALID_ZOOM),
        "mean": list(trained.stats["mean"]),
        "std": list(trained.stats["std"]),
        "input": f"uint8 (B, 3, {trained.size}, {trained.size}) RGB: shorter side resized to "
                 "`resize`, then centre-cropped to `size`",
        "output": "(B, len(vocab)) logits; softmax for probabilities",
    }
    info_path = json_path(out)
    atomic_write_text(info_path, json.dumps(info, indent=1, ensure_ascii=False))
    return out, info_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a `tench fit` run folder")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="the program, e.g. model.pt2 (model.json is written beside it)")


def main(args: argparse.Namespace) -> int:
    try:
        program, info = export_run(args.run_dir, args.out)
    except (ModelFileError, ValueError) as e:
        print(f"tench export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} to {program} (vocab, size, mean/std in {info})")
    return 0
