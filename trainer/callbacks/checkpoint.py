"""`last.pt`: everything needed to resume a run bit-identically, written atomically.

Layout (only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`):

    format_version     CHECKPOINT_VERSION
    epoch              index of the last completed epoch (resume with start_epoch=epoch + 1)
    schedule           {"n_epochs", "pct_train"}: where the schedules stood
    model              model.state_dict()
    optimizer          optimizer.state_dict()
    rng                {"torch", "cuda" (list, when CUDA is present), "numpy", "python"}
    history            learn.history (the metrics of every completed epoch)
    config             the run's resolved configuration (JSON-able dict)
    vocab              label names, index = label
    vocab_fingerprint  sha256 of the vocab (see shards.vocab), or None
    callbacks          {class name: state_dict()} of callbacks that keep state (the fp16
                       GradScaler's loss scale); older checkpoints without it still load
    mid_epoch          only in a checkpoint written mid-epoch (see `step_checkpoint`)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.atomic import atomic_open
from shards.vocab import vocab_fingerprint
from trainer.callbacks.core import Callback
from trainer.run_dir import LAST_NAME

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, another format, or another vocab."""


def rng_state() -> dict:
    """Every global RNG a training step can draw from, as weights-only-loadable values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _vocab_fields(vocab: Any) -> tuple[list[str] | None, str | None]:
    if vocab is None:
        return None, None
    names = list(getattr(vocab, "names", vocab))
    return names, vocab_fingerprint(names)


def checkpoint_state(learn, config: dict | None = None, vocab: Any = None) -> dict:
    """The checkpoint dict for `learn` as it stands after epoch `learn.epoch`."""
    try:  # fail now, not when loading: weights_only refuses anything but plain data
        config = json.loads(json.dumps(dict(config or {})))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint config must be JSON-able: {e}") from e
    names, fingerprint = _vocab_fields(vocab)
    return {
        "format_version": CHECKPOINT_VERSION,
        "epoch": learn.epoch,
        "schedule": {"n_epochs": learn.n_epochs, "pct_train": learn.pct_train},
        "model": learn.model.state_dict(),
        "optimizer": learn.opt.state_dict(),
        "rng": rng_state(),
        "history": json.loads(json.dumps(learn.history)),
        "config": config,
        "vocab": names,
        "vocab_fingerprint": fingerprint,
        "callbacks": callback_states(learn),
    }


def callback_states(learn) -> dict:
    """`{class name: cb.state_dict()}` of the callbacks that keep state across epochs
    (e.g. MixedPrecision's GradScaler), so a resumed run continues where it stopped."""
    return {type(cb).__name__: cb.state_dict() for cb in learn.cbs
            if callable(getattr(cb, "state_dict", None))}


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path, expected_fingerprint: str | None = None) -> dict:
    """Read a checkpoint (weights only, onto the CPU) and check its format and vocab."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there (nothing to resume from)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable tench checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_VERSION:
        found = ckpt.get("format_version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: checkpoint format {found!r}, this tench reads {CHECKPOINT_VERSION}"
        )
    if expected_fingerprint is not None and ckpt.get("vocab_fingerprint") != expected_fingerprint:
        stored = ckpt.get("vocab_fingerprint")
        stored_text = f"{stored[:12]}…" if stored else "none"
        raise CheckpointError(
            f"{path} was trained with a different label vocab (fingerprint {stored_text}, "
            f"vocab {ckpt.get('vocab')}) than the shards (fingerprint "
            f"{expected_fingerprint[:12]}…); resume only with shards from the same "
            "`tench shard` run, or start a new run directory"
        )
    return ckpt


def restore(learn, ckpt: dict, rng: bool = True) -> int:
    """Load model, optimizer, history (and RNG states) into `learn`; return the next epoch.

    Call it after building the learner and before `learn.fit(n, start_epoch=...)`.
    """
    learn.model.load_state_dict(ckpt["model"])
    if learn.opt is None:
        learn.create_opt()
    learn.opt.load_state_dict(ckpt["optimizer"])
    learn.history = list(ckpt.get("history", []))
    for cb in learn.cbs:
        saved = ckpt.get("callbacks", {}).get(type(cb).__name__)
        if saved is not None and callable(getattr(cb, "load_state_dict", None)):
            cb.load_state_dict(saved)
    if rng:
        set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]) + 1


class CheckpointCallback(Callback):
    """After every epoch, write `folder/last.pt` (see the module docstring for its layout).

    Runs after the stats (history includes the epoch) and after `NonFiniteGuard` (so
    NaN weights are never saved over a good checkpoint).
    """

    order = 70

    def __init__(self, folder: str | Path, config: dict | None = None, vocab: Any = None,
                 name: str = LAST_NAME):
        self.path = Path(folder) / name
        self.config, self.vocab = config, vocab

    def after_epoch(self, learn) -> None:
        save_checkpoint(self.path, checkpoint_state(learn, self.config, self.vocab))
