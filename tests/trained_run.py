"""A tiny real `tench fit` run on tiny real shards, for the predict/interpret/export tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.shard_fixtures import make_shards
from trainer.config import FitConfig
from trainer.fit import run_fit

SIZE = 32
COUNTS = {"train": 36, "valid": 23}  # 23: the last validation batch is a short one


@dataclass(frozen=True)
class TinyRun:
    shards: Path
    run: Path
    summary: dict


def train_tiny_run(root: str | Path, epochs: int = 2) -> TinyRun:
    """Shards (3 classes, JPEG + PNG) and a 2-epoch CPU run of the course's CNN on them."""
    root = Path(root)
    shards = make_shards(root / "shards", COUNTS, image_size=(44, 38), seed=1).folder
    config = FitConfig(shards=str(shards), out=str(root / "run"), arch="cnn", epochs=epochs,
                       batch_size=8, size=SIZE, actors=1, seed=0, lr=1e-2, device="cpu")
    return TinyRun(shards, root / "run", run_fit(config))
