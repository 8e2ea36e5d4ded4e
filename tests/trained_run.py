"""A tiny real `tench fit` run on tiny real shards, for the predict/interpret/export tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shards.vocab import Vocab
from tests.shard_fixtures import make_shards
from trainer.config import FitConfig
from trainer.fit import run_fit
from trainer.models import create_model
from trainer.run_dir import MODEL_FORMAT_VERSION, MODEL_NAME

SIZE = 32
COUNTS = {"train": 36, "valid": 23}  # 23: the last validation batch is a short one


@dataclass(frozen=True)
class TinyRun:
    shards: Path
    run: Path
    summary: dict
    labels: dict  # split -> {sample key: label index}, as written into the shards


def train_tiny_run(root: str | Path, epochs: int = 2) -> TinyRun:
    """Shards (3 classes, JPEG + PNG) and a 2-epoch CPU run of the course's CNN on them."""
    root = Path(root)
    shard_set = make_shards(root / "shards", COUNTS, image_size=(44, 38), seed=1)
    shards = shard_set.folder
    config = FitConfig(shards=str(shards), out=str(root / "run"), arch="cnn", epochs=epochs,
                       batch_size=8, size=SIZE, actors=1, seed=0, lr=1e-2, device="cpu",
                       lsuv=False)
    return TinyRun(shards, root / "run", run_fit(config), shard_set.labels)


def write_untrained_run(run_dir: str | Path, vocab: list[str], stats: dict, size: int = SIZE,
                        arch: str = "cnn", seed: int = 0) -> Path:
    """A run folder holding only model.pt (seeded random weights): enough for predict,
    interpret and export, without training."""
    torch.manual_seed(seed)
    model = create_model(arch, len(vocab))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": MODEL_FORMAT_VERSION, "arch": arch, "n_classes": len(vocab),
                "state_dict": model.state_dict(), "vocab": list(vocab),
                "vocab_fingerprint": Vocab(vocab).fingerprint,
                "stats": {"mean": list(stats["mean"]), "std": list(stats["std"])},
                "size": size}, run_dir / MODEL_NAME)
    return run_dir
