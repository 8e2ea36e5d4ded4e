"""Hyper-parameter schedules as pure functions of the training position p in [0, 1].

A schedule is a small frozen dataclass with `__call__(p) -> float`: picklable (unlike the
course's lambdas and decorated closures) and convertible to a plain dict with
`schedule_to_dict`, so the resolved schedule can go into `config.json` and into a checkpoint
that is read back with `torch.load(weights_only=True)`.

Formulas (course nb_05, fastai v2 `callback/schedule.py`):
    lin: start + p * (end - start)
    cos: start + (1 + cos(pi * (1 - p))) * (end - start) / 2
    exp: start * (end / start) ** p
    no:  start
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from trainer.optim import spread


@runtime_checkable
class Schedule(Protocol):
    """Anything that maps a position p in [0, 1] to a hyper-parameter value."""

    def __call__(self, pos: float) -> float: ...


_POS_SLACK = 1e-9  # positions computed as i / n may overshoot [0, 1] by round-off


def _check_pos(pos: float) -> float:
    pos = float(pos)
    if not -_POS_SLACK <= pos <= 1.0 + _POS_SLACK:  # also rejects NaN
        raise ValueError(f"schedule position must be in [0, 1], got {pos}")
    return min(max(pos, 0.0), 1.0)


@dataclass(frozen=True)
class LinearSchedule:
    start: float
    end: float

    def __call__(self, pos: float) -> float:
        return self.start + _check_pos(pos) * (self.end - self.start)


@dataclass(frozen=True)
class CosineSchedule:
    """Half a cosine from start to end: flat at both ends, steepest in the middle."""

    start: float
    end: float

    def __call__(self, pos: float) -> float:
        pos = _check_pos(pos)
        return self.start + (1 + math.cos(math.pi * (1 - pos))) * (self.end - self.start) / 2


@dataclass(frozen=True)
class ExponentialSchedule:
    """Geometric interpolation (the LR finder's sweep); start and end must be > 0."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not (self.start > 0 and self.end > 0):
            raise ValueError(
                f"sched_exp needs start > 0 and end > 0, got start={self.start}, end={self.end}"
            )

    def __call__(self, pos: float) -> float:
        return self.start * (self.end / self.start) ** _check_pos(pos)


@dataclass(frozen=True)
class ConstantSchedule:
    """Always `start`; `end` is kept only so every schedule has the same two arguments."""

    start: float
    end: float | None = None

    def __call__(self, pos: float) -> float:
        _check_pos(pos)
        return self.start


@dataclass(frozen=True)
class CombinedSchedule:
    """Piecewise schedule: `scheds[i]` runs over a fraction `pcts[i]` of training.

    Each piece sees its own position rescaled to [0, 1]. Unlike the course's version this
    never indexes past the last piece, so p = 1.0 returns the last piece's end value.
    Zero-width pieces are allowed (e.g. a one-cycle with no warm-up) and simply skipped.
    """

    pcts: tuple[float, ...]
    scheds: tuple[Schedule, ...]

    def __post_init__(self) -> None:
        if len(self.pcts) != len(self.scheds) or not self.pcts:
            raise ValueError(
                f"combine_scheds needs one pct per schedule, got {len(self.pcts)} pcts "
                f"and {len(self.scheds)} schedules"
            )
        if any(not p >= 0 for p in self.pcts):
            raise ValueError(f"combine_scheds pcts must all be >= 0, got {list(self.pcts)}")
        if not math.isclose(sum(self.pcts), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"combine_scheds pcts must sum to 1, got {list(self.pcts)} (sum {sum(self.pcts)})"
            )
        for sched in self.scheds:
            if not callable(sched):
                raise TypeError(f"combine_scheds got a non-callable schedule: {sched!r}")

    def __call__(self, pos: float) -> float:
        pos = _check_pos(pos)
        start = 0.0
        chosen, chosen_start = 0, 0.0
        for i, pct in enumerate(self.pcts):
            # The last non-empty piece that starts at or before pos; at pos = 1.0 this is
            # the final piece (the course indexed pcts[idx + 1] here and crashed).
            if pct > 0 and start <= pos:
                chosen, chosen_start = i, start
            start += pct
        local = (pos - chosen_start) / self.pcts[chosen]
        return self.scheds[chosen](min(max(local, 0.0), 1.0))  # clamp float round-off


def sched_lin(start: float, end: float) -> LinearSchedule:
    return LinearSchedule(float(start), float(end))


def sched_cos(start: float, end: float) -> CosineSchedule:
    return CosineSchedule(float(start), float(end))


def sched_exp(start: float, end: float) -> ExponentialSchedule:
    return ExponentialSchedule(float(start), float(end))


def sched_no(start: float, end: float | None = None) -> ConstantSchedule:
    return ConstantSchedule(float(start), None if end is None else float(end))


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Schedule]) -> CombinedSchedule:
    """Join schedules end to end; `pcts` (fractions of training, summing to 1) size each."""
    return CombinedSchedule(tuple(float(p) for p in pcts), tuple(scheds))


def one_cycle(
    lr_max: float,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
) -> dict[str, CombinedSchedule]:
    """The 1cycle policy as fastai v2's `fit_one_cycle` builds it.

    lr: cosine warm-up lr_max/div -> lr_max over `pct_start`, then cosine down to
    lr_max/div_final. mom (when `moms` is given): cosine moms[0] -> moms[1] -> moms[2] over
    the same two phases, i.e. momentum is lowest when the lr is highest.
    """
    if not lr_max > 0:
        raise ValueError(f"one_cycle needs lr_max > 0, got {lr_max}")
    if not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"one_cycle needs pct_start in [0, 1], got {pct_start}")
    if not (div > 0 and div_final > 0):
        raise ValueError(f"one_cycle needs div > 0 and div_final > 0, got {div}, {div_final}")
    pcts = (pct_start, 1.0 - pct_start)
    scheds = {
        "lr": combine_scheds(
            pcts, [sched_cos(lr_max / div, lr_max), sched_cos(lr_max, lr_max / div_final)]
        )
    }
    if moms is not None:
        if len(moms) != 3:
            raise ValueError(f"one_cycle moms must be (start, middle, end), got {moms}")
        scheds["mom"] = combine_scheds(
            pcts, [sched_cos(moms[0], moms[1]), sched_cos(moms[1], moms[2])]
        )
    return scheds


_KINDS: dict[str, type] = {
    "lin": LinearSchedule,
    "cos": CosineSchedule,
    "exp": ExponentialSchedule,
    "no": ConstantSchedule,
}


def schedule_to_dict(sched: Schedule) -> dict:
    """A JSON-able description of a schedule (for config.json and weights-only checkpoints)."""
    if isinstance(sched, CombinedSchedule):
        return {
            "kind": "combined",
            "pcts": list(sched.pcts),
            "scheds": [schedule_to_dict(s) for s in sched.scheds],
        }
    for kind, cls in _KINDS.items():
        if type(sched) is cls:
            return {"kind": kind, "start": sched.start, "end": sched.end}
    raise TypeError(f"cannot describe schedule {sched!r}: not one of trainer.schedules' types")


def schedule_from_dict(data: dict) -> Schedule:
    """Inverse of `schedule_to_dict`; raises ValueError on an unknown or malformed entry."""
    try:
        kind = data["kind"]
        if kind == "combined":
            return combine_scheds(data["pcts"], [schedule_from_dict(s) for s in data["scheds"]])
        if kind not in _KINDS:
            raise ValueError(
                f"unknown schedule kind {kind!r}; expected one of {sorted(_KINDS)} or 'combined'"
            )
        end = data["end"]
        return _KINDS[kind](float(data["start"]), None if end is None else float(end))
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed schedule description {data!r}: {err}") from err


def fine_tune(
    lr_max: float, freeze_pct: float, n_groups: int, pct_start: float = 0.25,
    lr_mult: float = 100.0,
) -> dict[str, list[CombinedSchedule] | CombinedSchedule]:
    """fastai's `fine_tune` as one schedule of the whole run, one lr schedule per param group.

    The frozen phase (the first `freeze_pct` of training) is a one-cycle with pct_start 0.99
    peaking at lr_max for the head and lr_max/10 for the body (fastai's `slice(lr_max)`;
    only the body's BatchNorm trains then). The rest is a fresh one-cycle with discriminative
    lrs spread log-evenly from lr_max/2/lr_mult (earliest group) to lr_max/2 (the head),
    the spread `Optimizer` gives `lr=slice(lo, hi)`.
    """
    if n_groups < 1:
        raise ValueError(f"fine_tune needs n_groups >= 1, got {n_groups}")
    frozen_peaks = [lr_max / 10] * (n_groups - 1) + [lr_max]
    peaks = spread("lr", slice(lr_max / 2 / lr_mult, lr_max / 2), n_groups)
    pcts = (freeze_pct, 1.0 - freeze_pct)
    frozen = [one_cycle(peak, pct_start=0.99) for peak in frozen_peaks]
    unfrozen = [one_cycle(peak, pct_start=pct_start) for peak in peaks]
    return {
        "lr": [combine_scheds(pcts, [a["lr"], b["lr"]])
               for a, b in zip(frozen, unfrozen, strict=True)],
        "mom": combine_scheds(pcts, [frozen[0]["mom"], unfrozen[0]["mom"]]),
    }
