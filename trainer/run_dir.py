"""The run folder `tench fit --out RUN_DIR`: its file names, the model file, the run summary.

This module is the one place that knows what a run folder holds:

    config.json                  the resolved FitConfig (the lr the finder picked included)
    metrics.json / metrics.csv   one row per completed epoch, rewritten atomically each epoch
    last.pt                      everything to resume (trainer/callbacks/checkpoint.py's format)
    model.pt                     what `tench predict` needs (MODEL_FORMAT_VERSION, below)
    loss.png, schedule.png       plots after fit; lr_find.png with --lr-find
    ray_run.json, ray/           data-parallel runs: where Ray Train keeps its checkpoints

Every file is written atomically, so a run killed mid-write leaves the previous complete one.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards.atomic import TMP_SUFFIX, atomic_open, atomic_write_text
from trainer.config import FitConfig, FitError
from trainer.models import create_model

CONFIG_NAME = "config.json"
METRICS_JSON_NAME = "metrics.json"
METRICS_CSV_NAME = "metrics.csv"
LAST_NAME = "last.pt"
MODEL_NAME = "model.pt"
LOSS_PLOT_NAME = "loss.png"
SCHEDULE_PLOT_NAME = "schedule.png"
LR_FIND_PLOT_NAME = "lr_find.png"
RAY_RUN_NAME = "ray_run.json"  # where Ray Train keeps a data-parallel run (for --resume)
RAY_STORAGE_NAME = "ray"  # Ray Train's default storage folder inside RUN_DIR
# Files a run writes; --force removes only these, never anything else in RUN_DIR.
RUN_FILES = (CONFIG_NAME, METRICS_JSON_NAME, METRICS_CSV_NAME, LAST_NAME, MODEL_NAME,
             LOSS_PLOT_NAME, SCHEDULE_PLOT_NAME, LR_FIND_PLOT_NAME)

MODEL_FORMAT_VERSION = 1
MODEL_KEYS = frozenset({"format_version", "arch", "n_classes", "state_dict", "vocab",
                        "vocab_fingerprint", "stats", "size"})


class ModelFileError(ValueError):
    """A model.pt that is missing, unreadable or of another format; the message names it."""


# ----------------------------------------------------------------------------- the folder
def prepare_run_dir(config: FitConfig) -> Path:
    """Refuse to mix two runs in one folder: non-empty needs --resume or --force."""
    run_dir = Path(config.out)
    if not config.out:
        raise FitError("no run folder: give --out RUN_DIR")
    if run_dir.exists() and not run_dir.is_dir():
        raise FitError(f"{run_dir}: exists and is not a folder")
    busy = run_dir.is_dir() and any(run_dir.iterdir())
    if config.resume:
        if not (run_dir / LAST_NAME).is_file():
            raise FitError(f"{run_dir / LAST_NAME}: no checkpoint to resume from; start the "
                           "run without --resume")
    elif busy and not config.force:
        raise FitError(f"{run_dir}: not empty (an earlier run?); pass --resume to continue "
                       "it, --force to start over there, or choose another --out")
    elif busy:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(run_dir)
    return run_dir


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed writer left (`.last.pt.<pid>.partial`, ...): only
    those of the run's own file names, so nothing else in RUN_DIR is touched."""
    gone = []
    for name in RUN_FILES:
        for path in run_dir.glob(f".{name}.*{TMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            gone.append(path)
    return gone


def write_config(run_dir: str | Path, config: FitConfig) -> Path:
    path = Path(run_dir) / CONFIG_NAME
    atomic_write_text(path, config.to_json())
    return path


def read_config(run_dir: str | Path) -> FitConfig | None:
    """The run's config.json (older field names mapped), or None when there is none."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return FitConfig.from_json(path.read_text())
    except ValueError as e:
        raise FitError(f"{path}: not a usable tench fit config ({e})") from e


def history_csv(history: list[dict]) -> str:
    """The metrics rows as CSV, one column per key seen in any row."""
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def write_metrics(run_dir: str | Path, history: list[dict]) -> None:
    """metrics.json (a list, one object per epoch) and metrics.csv, both atomically."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / METRICS_JSON_NAME, json.dumps(history, indent=1))
    atomic_write_text(run_dir / METRICS_CSV_NAME, history_csv(history))


# ----------------------------------------------------------------------------- model.pt
@dataclass(frozen=True)
class TrainedModel:
    """A model read back from model.pt, with what it needs to see images as in training."""

    model: torch.nn.Module  # on the CPU, in eval mode
    arch: str
    vocab: list[str]  # label names, index = class
    stats: dict  # {"mean": [r, g, b], "std": [r, g, b]} on the 0-1 scale
    size: int  # image side it was trained at


def save_model(run_dir: str | Path, model: torch.nn.Module, config: FitConfig, vocab: Any,
               stats: dict) -> Path:
    """Write RUN_DIR/model.pt: weights-only loadable (tensors, numbers, strings)."""
    state = {
        "format_version": MODEL_FORMAT_VERSION,
        "arch": config.arch,
        "n_classes": len(vocab),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "vocab": list(vocab.names),
        "vocab_fingerprint": vocab.fingerprint,
        "stats": {"mean": list(stats["mean"]), "std": list(stats["std"])},
        "size": config.size,
    }
    path = Path(run_dir) / MODEL_NAME
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def load_model(run_dir: str | Path) -> TrainedModel:
    """Read RUN_DIR/model.pt (weights only, onto the CPU) and rebuild its model."""
    path = Path(run_dir) / MODEL_NAME
    if not path.is_file():
        raise ModelFileError(f"{path}: no model there; is {run_dir} a finished `tench fit` run?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-object files
        raise ModelFileError(f"{path}: not a readable tench model ({e})") from e
    if not isinstance(state, dict) or not set(state) >= MODEL_KEYS:
        raise ModelFileError(f"{path}: not a tench model file (needs keys {sorted(MODEL_KEYS)})")
    if state["format_version"] != MODEL_FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format {state['format_version']!r}, this tench "
                             f"reads {MODEL_FORMAT_VERSION}")
    model = create_model(state["arch"], int(state["n_classes"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    return TrainedModel(model, state["arch"], list(state["vocab"]), dict(state["stats"]),
                        int(state["size"]))


# ----------------------------------------------------------------------------- summary
def run_summary(run_dir: Path, model_path: Path, config: FitConfig, history: list[dict],
                start_time: float, **extra: Any) -> dict:
    """What `run_fit`/`run_distributed` return: where things are and how the run ended."""
    last = history[-1] if history else {}
    return {
        "run_dir": str(run_dir),
        "model": str(model_path),
        "epochs": config.epochs,
        "lr": config.lr,
        "train_loss": last.get("train_loss"),
        "valid_loss": last.get("valid_loss"),
        "accuracy": last.get("accuracy"),
        "accuracy_tta": last.get("accuracy_tta"),  # None unless the run asked for --tta
        "seconds": round(time.perf_counter() - start_time, 3),
        "config": config.to_dict(),
        **extra,
    }


def summary_line(summary: dict, where: str = "") -> str:
    """The one line `tench fit` ends with; `where` e.g. " on 4 workers"."""
    accuracy = summary["accuracy"]
    accuracy_text = "n/a" if accuracy is None else f"{accuracy:.1%}"
    if summary.get("accuracy_tta") is not None:
        accuracy_text += f" ({summary['accuracy_tta']:.1%} with TTA)"
    return (f"done: {summary['epochs']} epochs{where} in {summary['seconds']:.1f}s, validation "
            f"accuracy {accuracy_text}; model in {summary['model']}")
