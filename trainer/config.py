"""`FitConfig`: every setting of a training run in one frozen dataclass.

Its defaults are the defaults of `tench fit`; the resolved config (the lr picked by the
finder included) is written to `RUN_DIR/config.json` and into every checkpoint, so a run
can be resumed with exactly the settings it started with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from pipeline.settings import StreamSettings

OPTIMIZERS = ("sgd", "adam", "lamb", "radam", "ranger")

# Fields renamed since (config.json and last.pt of older runs still load): old -> new.
RENAMED_FIELDS = {"bs": "batch_size", "workers": "actors"}

# Settings that may change when a run is resumed: they do not change what is computed
# (epochs is checked separately: it must stay the same for the schedule to line up).
RUNTIME_FIELDS = frozenset({"address", "device", "resume", "force", "cache_dir", "cache_limit",
                            "tta", "checkpoint_every", "checkpoint_minutes"})


class FitError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class FitConfig:
    """One training run: data, model, optimizer, schedule, regularisation, where to write."""

    shards: str = ""
    out: str = ""
    more_shards: tuple[str, ...] = ()  # further data sets in the same stream (pipeline.mix)
    weights: tuple[float, ...] | None = None  # one per data set: train draws in proportion
    epoch_size: int | None = None  # with weights: training samples per epoch
    # The defaults are the recipe `./run demo` measures (README): a half-width one-block
    # XResNet with LSUV and a one-cycle peak of 1e-2 took the demo's shapes from 40% (the
    # course's CNN, 3e-3) to 95%+ in 12 epochs of 3,000 images at 64 px.
    arch: str = "xresnet10_half"
    epochs: int = 12
    batch_size: int = 64  # per process (data-parallel: per Ray Train worker)
    lr: float | None = 1e-2  # None: pick it with the LR finder (lr_find=True)
    lr_find: bool = False
    opt: str = "adam"
    wd: float = 0.01
    pct_start: float = 0.25
    size: int = 64  # the final training side, and validation's
    size_start: int | None = None  # progressive resizing from this side (trainer.callbacks.resize)
    tta: bool = False  # a last validation pass with test-time augmentation (accuracy_tta)
    lsuv: bool = True  # LSUV init of a model trained from scratch (never of --init's weights)
    mixup: float = 0.0  # alpha; 0 = off
    label_smoothing: float = 0.0  # eps; 0 = plain cross-entropy
    actors: int | None = 1  # Ray actors per stream (decode + augment); None = the cluster's CPUs
    seed: int = 0
    resume: bool = False
    force: bool = False
    address: str | None = None
    device: str | None = None  # None: CUDA when present, else CPU
    cache_dir: str | None = None  # remote shards: download each once to this folder
    cache_limit: str = "50GB"  # the cache's size bound (bytes, or "50GB", "512MiB", ...)
    init: str | None = None  # start from this run folder, model.pt or state-dict file
    freeze_epochs: int = 0  # the first N of `epochs` train the head (and BatchNorm) only
    checkpoint_every: int = 200  # also write last.pt every N training steps (0: off)
    checkpoint_minutes: float | None = None  # ... and/or every M minutes (None: off)

    def __post_init__(self) -> None:
        problems = []
        # tuples, also when read back from JSON lists, so configs compare equal
        object.__setattr__(self, "more_shards", tuple(self.more_shards))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != 1 + len(self.more_shards):
                problems.append(f"{len(self.weights)} weights for "
                                f"{1 + len(self.more_shards)} data sets; give one each")
        elif self.epoch_size is not None:
            problems.append("epoch_size needs weights (one per data set)")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.size < 8:
            problems.append(f"size must be >= 8, got {self.size}")
        if self.size_start is not None and not 8 <= self.size_start <= self.size:
            problems.append(f"size_start must be in [8, size={self.size}], got {self.size_start}")
        if self.lr is None and not self.lr_find:
            problems.append("give an lr or ask for lr_find")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.opt not in OPTIMIZERS:
            problems.append(f"opt must be one of {', '.join(OPTIMIZERS)}, got {self.opt!r}")
        if self.wd < 0:
            problems.append(f"wd must be >= 0, got {self.wd}")
        if not 0 <= self.pct_start <= 1:
            problems.append(f"pct_start must be in [0, 1], got {self.pct_start}")
        if self.mixup < 0:
            problems.append(f"mixup alpha must be >= 0 (0 = off), got {self.mixup}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every must be >= 0 (0 = off), got {self.checkpoint_every}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            problems.append(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if self.actors is not None and self.actors < 1:
            problems.append(f"actors must be >= 1, got {self.actors}")
        if not 0 <= self.freeze_epochs <= self.epochs:
            problems.append(f"freeze_epochs must be in [0, epochs], got {self.freeze_epochs}")
        if self.freeze_epochs and not self.init:
            problems.append("freeze_epochs needs init (a model to fine-tune)")
        if problems:
            raise ValueError("invalid fit config: " + "; ".join(problems))

    def stream_settings(self) -> StreamSettings:
        """How this run's streams batch and order their data (both splits, every rank)."""
        return StreamSettings(batch_size=self.batch_size, seed=self.seed, num_actors=self.actors,
                              cache_dir=self.cache_dir, cache_limit=self.cache_limit)

    def replace(self, **changes: Any) -> FitConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON types (tuples as lists), as config.json and last.pt hold it."""
        data = dataclasses.asdict(self)
        for name in ("more_shards", "weights"):
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> FitConfig:
        """From `to_dict` output; unknown keys are an error (a config from another tench).

        Older runs' names are mapped: `bs` -> `batch_size`, `workers` -> `actors`; `mom` is
        dropped (sgd's momentum is driven by the one-cycle schedule whatever it started at)
        and `one_cycle` must be true (the one schedule tench trains with).
        """
        data = dict(data)
        for name in ("more_shards", "weights"):  # JSON has lists where the config has tuples
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        for old, new in RENAMED_FIELDS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"fit config has both {old!r} (the old name) and {new!r}")
                data[new] = data.pop(old)
        data.pop("mom", None)
        if data.pop("one_cycle", True) is not True:
            raise ValueError("fit config has one_cycle=false, a constant-lr run of an older "
                             "tench; this tench trains with the one-cycle schedule only: "
                             "start a new run")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fit config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> FitConfig:
        return cls.from_dict(json.loads(text))

    def differences(self, other: FitConfig, ignore: frozenset = RUNTIME_FIELDS) -> dict:
        """{field: (self's value, other's value)} for fields that differ, `ignore` left out."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}

