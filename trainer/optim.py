"""One generic, stateful optimizer: statistics + steppers make it SGD, Adam, RAdam, LAMB, LARS...

`Optimizer` subclasses `torch.optim.Optimizer` because torch's learning-rate schedulers accept
nothing else (they check ``isinstance(optimizer, torch.optim.Optimizer)``). From the base class
it keeps only the bookkeeping: torch-shaped ``param_groups`` (one dict per group: ``'params'`` and
that group's hyper-parameters) are the single source of truth, so schedulers, `torch.amp.GradScaler`
and ``clip_grad_norm_`` work unchanged, and ``state_dict()`` has torch's layout (state listed by
parameter position, hyper-parameters inside the groups). The maths lives in `trainer.steppers`.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainer.steppers import (
    AverageGrad,
    AverageSqrGrad,
    L2Penalty,
    SlowWeights,
    Stat,
    StepCount,
    TrustScaledMomentum,
    adam_step,
    decoupled_weight_decay,
    lamb_step,
    lookahead_step,
    momentum_step,
    radam_step,
    rms_prop_momentum_step,
    rms_prop_step,
    sgd_step,
)

Params = Iterable[Tensor] | Iterable[Iterable[Tensor]] | Iterable[dict[str, Any]]
Stepper = Callable[..., Any]

_TORCH_GROUP_KEYS = frozenset({"params", "param_names"})  # keys torch itself puts in a group
_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class _Stage:
    """One stat update or stepper and the names it reads from the group and from the state."""

    fn: Callable[..., Any]
    label: str
    hypers: tuple[str, ...]
    state: tuple[str, ...]


def _keyword_args(fn: Callable[..., Any], label: str) -> dict[str, Any]:
    """Keyword-only arguments of a stat update or stepper, with defaults (or _REQUIRED)."""
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 2:
        raise TypeError(f"{label} must take (params, grads, *, <hyper-parameters>, <state>)")
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def _wire(steppers: Sequence[Stepper], stats: Sequence[Stat]):
    """Resolve every keyword name to per-parameter state or a hyper-parameter.

    Returns (stages, state names, hyper-parameter -> first user, signature defaults).
    """
    state_owner: dict[str, str] = {}
    for stat in stats:
        for name in stat.state_names:
            if name in state_owner:
                raise ValueError(f"state '{name}' is kept by both {state_owner[name]} and "
                                 f"{type(stat).__name__}")
            state_owner[name] = type(stat).__name__
    pieces = [(stat.update, type(stat).__name__) for stat in stats]
    pieces += [(fn, getattr(fn, "__name__", repr(fn))) for fn in steppers]
    stages, users, defaults = [], {}, {}
    for fn, label in pieces:
        kwargs = _keyword_args(fn, label)
        hypers = tuple(name for name in kwargs if name not in state_owner)
        for name in hypers:
            users.setdefault(name, label)
            if kwargs[name] is not _REQUIRED:
                defaults.setdefault(name, set()).add(kwargs[name])
        state = tuple(name for name in kwargs if name in state_owner)
        stages.append(_Stage(fn, label, hypers, state))
    return stages, tuple(state_owner), users, defaults


def _check_known(names: Iterable[str], users: dict[str, str], where: str) -> None:
    """Fail loudly on a hyper-parameter that no stat or stepper reads (e.g. 'mom_sqr')."""
    for name in names:
        if name not in users:
            swapped = [known for known in users
                       if sorted(known.split("_")) == sorted(name.split("_"))]
            close = swapped or difflib.get_close_matches(name, users, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown hyper-parameter '{name}' in {where}{hint} "
                             f"(known: {', '.join(sorted(users))})")


def _as_groups(params: Params) -> list[dict[str, Any]]:
    """A list of tensors (or named tensors), a list of lists, or torch-style dicts -> dicts."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, lists of tensors or dicts, "
                        "not a single tensor")
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    if all(isinstance(item, dict) for item in items):
        return [dict(group) for group in items]
    if any(isinstance(item, dict) for item in items):
        raise TypeError("params mixes param-group dicts with other items")
    if all(isinstance(item, Tensor | tuple) for item in items):
        return [{"params": items}]  # one group; (name, tensor) pairs are handled by torch
    return [{"params": list(group)} for group in items]


def spread(name: str, value: Any, n_groups: int) -> list[Any]:
    """One value per param group: slice(lo, hi) spreads log-evenly from lo to hi (discriminative
    learning rates), a list or tuple gives each group its own value, anything else is shared."""
    if isinstance(value, slice):
        lo, hi = value.start, value.stop
        if value.step is not None or lo is None or hi is None or lo <= 0 or hi <= 0:
            raise ValueError(f"hyper-parameter '{name}' as a slice must be slice(lo, hi) with "
                             f"0 < lo, 0 < hi; got {value}")
        if n_groups == 1:
            return [hi]
        middle = [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(1, n_groups - 1)]
        return [lo, *middle, hi]
    if isinstance(value, list | tuple):
        if len(value) != n_groups:
            raise ValueError(f"hyper-parameter '{name}' has {len(value)} values for "
                             f"{n_groups} param groups")
        return list(value)
    return [value] * n_groups


def _chunks(params: list[Tensor], cpu_chunk_numel: int) -> list[tuple[int, int]]:
    """Index ranges of consecutive parameters to step one range after the other.

    On a GPU the whole group is one range: each foreach call is a few kernel launches. On a CPU a
    foreach call is a loop over the tensors, and sweeping all of ResNet-50's 100 MB of weights
    (and as much again for each gradient and state) once per operation runs from main memory;
    ranges of about cpu_chunk_numel elements keep their data in cache across a step's operations
    (this halves an AdamW step on ResNet-50).
    """
    if params[0].device.type != "cpu":
        return [(0, len(params))]
    ranges, start, total = [], 0, 0
    for i, p in enumerate(params):
        n = p.numel()
        if total and total + n > cpu_chunk_numel:  # a big tensor gets a range of its own
            ranges.append((start, i))
            start, total = i, 0
        total += n
    ranges.append((start, len(params)))
    return ranges


class Optimizer(torch.optim.Optimizer):
    """Stats update per-parameter state from the gradient, then steppers move the parameters.

    ``Optimizer(params, steppers, stats=(), **hypers)``: every keyword-only name of the steppers
    and of the stats' ``update`` must be a hyper-parameter (given here, in a group dict, or as a
    keyword default in the signature) or state kept by a stat; anything else fails here.
    A hyper-parameter given as ``slice(lo, hi)`` or a list is spread over the param groups.

    Stats and steppers must treat the entries of their lists independently: on a CPU a group is
    handed to them in several chunks (see `_chunks`).
    """

    cpu_chunk_numel = 1 << 19  # elements per chunk on a CPU; measured in bench/optim_bench.py

    def __init__(self, params: Params, steppers: Stepper | Sequence[Stepper],
                 stats: Sequence[Stat] = (), **hypers: Any) -> None:
        self.steppers = (steppers,) if callable(steppers) else tuple(steppers)
        self.stats = tuple(stats)
        self._stages, self._state_names, self._users, signature_defaults = _wire(
            self.steppers, self.stats)
        _check_known(hypers, self._users, "Optimizer(...)")
        groups = _as_groups(params)
        defaults = {}
        for name, values in signature_defaults.items():
            if len(values) > 1 and name not in hypers:
                raise ValueError(f"steppers and stats disagree on the default of '{name}' "
                                 f"({sorted(values)}); pass {name}=... explicitly")
            defaults[name] = next(iter(values))
        for name, value in hypers.items():
            values = spread(name, value, len(groups))
            for group, group_value in zip(groups, values, strict=True):
                group.setdefault(name, group_value)
            defaults[name] = values[-1]  # what a group added later gets
        super().__init__(groups, defaults)

    @property
    def hyper_names(self) -> frozenset[str]:
        """The hyper-parameters this optimizer reads from each param group."""
        return frozenset(self._users)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, after checking the group's hyper-parameter names."""
        given = [name for name in param_group if name not in _TORCH_GROUP_KEYS]
        _check_known(given, self._users, f"param group {len(self.param_groups)}")
        for name in given:
            if isinstance(param_group[name], slice):
                raise ValueError(f"param group {len(self.param_groups)}: '{name}' is a slice; "
                                 "slices are spread by Optimizer(..., name=slice(lo, hi))")
        for name, user in self._users.items():
            if name not in param_group and name not in self.defaults:
                raise ValueError(f"no value for hyper-parameter '{name}' (needed by {user}) "
                                 f"in param group {len(self.param_groups)}")
        super().add_param_group(param_group)
        if any(p.is_complex() for p in self.param_groups[-1]["params"]):
            raise ValueError("complex parameters are not supported; use torch.view_as_real")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self.state[p] for p in params] if self._state_names else []
        if states and not all(states):
            for p, state in zip(params, states, strict=True):
                if not state:
                    for stat in self.stats:
                        state.update(stat.init_state(p))
        for start, stop in _chunks(params, self.cpu_chunk_numel):
            self._step_chunk(group, params[start:stop], states[start:stop])

    def _step_chunk(self, group: dict[str, Any], params: list[Tensor],
                    states: list[dict[str, Any]]) -> None:
        """Run every stat, then every stepper, on one list of parameters."""
        grads = [p.grad for p in params]
        lists = {name: [state[name] for state in states] for name in self._state_names}
        for stage in self._stages:
            kwargs = {name: group[name] for name in stage.hypers}
            for name in stage.state:
                kwargs[name] = lists[name]
            new_grads = stage.fn(params, grads, **kwargs)
            if new_grads is not None:
                grads = new_grads
        for name, values in lists.items():
            if not isinstance(values[0], Tensor):  # plain numbers (step counts) are copies
                for state, value in zip(states, values, strict=True):
                    state[name] = value

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict on a copy (the loaded state never shares tensors with the
        source), after checking it was saved by an optimizer with the same stats."""
        state_dict = copy.deepcopy(state_dict)
        for i, group in enumerate(state_dict["param_groups"]):
            missing = [name for name in self._users if name not in group]
            if missing:
                raise ValueError(f"saved param group {i} has no value for {missing}: it was "
                                 "saved by an optimizer with different steppers")
        expected = set(self._state_names)
        for index, state in state_dict["state"].items():
            if state and set(state) != expected:
                raise ValueError(f"saved state of parameter {index} has {sorted(state)}, this "
                                 f"optimizer's stats keep {sorted(expected)}")
        super().load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "steppers": self.steppers, "stats": self.stats,
                "_stages": self._stages, "_state_names": self._state_names,
                "_users": self._users}


# --------------------------------------------------------------------------- recipes


def _weight_decay(decouple_wd: bool) -> tuple[list[Stat], list[Stepper]]:
    """Decoupled: p ← p·(1 − lr·wd) before the update. L2: g ← g + wd·p before the stats."""
    return ([], [decoupled_weight_decay]) if decouple_wd else ([L2Penalty()], [])


def sgd(params: Params, lr: float, mom: float = 0.0, wd: float = 0.0,
        decouple_wd: bool = True) -> Optimizer:
    """SGD; with mom > 0, momentum without dampening (torch.optim.SGD's dampening=0)."""
    stats, steppers = _weight_decay(decouple_wd)
    if mom == 0:
        return Optimizer(params, [*steppers, sgd_step], stats, lr=lr, wd=wd)
    return Optimizer(params, [*steppers, momentum_step], [*stats, AverageGrad()],
                     lr=lr, mom=mom, wd=wd)


def adam(params: Params, lr: float, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5,
         wd: float = 0.01, decouple_wd: bool = True) -> Optimizer:
    """Adam; decouple_wd=True is AdamW."""
    stats, steppers = _weight_decay(decouple_wd)
    stats += [AverageGrad(dampening=True), AverageSqrGrad(), StepCount()]
    return Optimizer(params, [*steppers, adam_step], stats,
                     lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)


def rms_prop(params: Params, lr: float, sqr_mom: float = 0.99, mom: float = 0.0,
             eps: float = 1e-8, wd: float = 0.0, decouple_wd: bool = True) -> Optimizer:
    """RMSProp; with mom > 0 the raw gradient is averaged, then divided (fastai's form)."""
    stats, steppers = _weight_decay(decouple_wd)
    if mom == 0:
        return Optimizer(params, [*steppers, rms_prop_step], [*stats, AverageSqrGrad()],
                         lr=lr, sqr_mom=sqr_mom, eps=eps, wd=wd)
    return Optimizer(params, [*steppers, rms_prop_momentum_step],
                     [*stats, AverageGrad(), AverageSqrGrad()],
                     lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)


def radam(params: Params, lr: float, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5,
          wd: float = 0.0, decouple_wd: bool = True, rect_threshold: float = 5.0) -> Optimizer:
    """Rectified Adam. rect_threshold=5 matches torch.optim.RAdam; the paper's is 4."""
    stats, steppers = _weight_decay(decouple_wd)
    stats += [AverageGrad(dampening=True), AverageSqrGrad(), StepCount()]
    return Optimizer(params, [*steppers, radam_step], stats, lr=lr, mom=mom, sqr_mom=sqr_mom,
                     eps=eps, wd=wd, rect_threshold=rect_threshold)


def lamb(params: Params, lr: float, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-6,
         wd: float = 0.0) -> Optimizer:
    """LAMB, the paper's Algorithm 2: wd·p is added to the Adam ratio before the trust ratio."""
    return Optimizer(params, [lamb_step], [AverageGrad(dampening=True), AverageSqrGrad(),
                                           StepCount()],
                     lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)


def lars(params: Params, lr: float, mom: float = 0.9, wd: float = 0.0, trust_coeff: float = 0.02,
         eps: float = 1e-8) -> Optimizer:
    """LARS (You et al. 2017): momentum of the trust-scaled, weight-decayed gradient."""
    return Optimizer(params, [momentum_step], [TrustScaledMomentum()],
                     lr=lr, mom=mom, wd=wd, trust_coeff=trust_coeff, eps=eps)


def lookahead(opt: Optimizer, k: int = 6, alpha: float = 0.5) -> Optimizer:
    """A new optimizer that steps like ``opt`` and every k steps pulls the weights back towards
    their slow copy: slow ← slow + alpha·(fast − slow), fast ← slow. Use it in place of ``opt``;
    the slow weights and the per-parameter step counter are part of its state_dict."""
    if any(opt.state.values()):
        raise ValueError("lookahead() wraps an optimizer before its first step")
    keeps_step = any("step" in stat.state_names for stat in opt.stats)
    stats = [*opt.stats, SlowWeights(), *([] if keeps_step else [StepCount()])]
    groups = [dict(group) for group in opt.param_groups]
    return Optimizer(groups, [*opt.steppers, lookahead_step], stats, k=k, alpha=alpha)


def ranger(params: Params, lr: float, mom: float = 0.95, sqr_mom: float = 0.99,
           eps: float = 1e-6, wd: float = 0.01, k: int = 6, alpha: float = 0.5) -> Optimizer:
    """Ranger = lookahead(radam)."""
    return lookahead(radam(params, lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd), k=k,
                     alpha=alpha)
