"""Statistics and steppers: the pieces the generic `Optimizer` is assembled from.

Each piece works on a whole parameter group at once. ``params`` and ``grads`` are lists of
tensors and every named state is a list with one entry per parameter, so the maths runs as
``torch._foreach_*`` calls (one kernel per list on a GPU) instead of a Python loop per parameter.

The keyword-only arguments are the wiring: the Optimizer looks each name up in the param group
(a hyper-parameter such as ``lr``) or in the per-parameter state (such as ``grad_avg``), and checks
every name when it is built, so a misspelt hyper-parameter fails at once instead of being ignored.

- A *stat* (the `Stat` protocol) owns per-parameter state: ``state_names``, ``init_state(p)`` and
  ``update(params, grads, *, ...)``. Stats run first, in order, and see the gradient before any
  parameter moves; a stat may return a replacement gradient list, which is how L2 regularisation
  reaches the momentum and Adam statistics.
- A *stepper* is a plain function ``f(params, grads, *, ...) -> None`` that moves the parameters.

Both must treat the entries of their lists independently: on a CPU the Optimizer hands a group
over in cache-sized chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

LAMB_MAX_TRUST = 10.0  # LAMB's trust ratio cap, as in the NVIDIA and fastai implementations


class Stat(Protocol):
    """Per-parameter statistic updated from the gradient before the steppers run."""

    state_names: ClassVar[tuple[str, ...]]

    def init_state(self, p: Tensor) -> dict[str, Any]: ...

    def update(self, params: list[Tensor], grads: list[Tensor], **kwargs: Any) -> Any: ...


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class AverageGrad:
    """Running average of the gradient, ``grad_avg``.

    dampening=True : m ← mom·m + (1 − mom)·g  (Adam's first moment; computed as a lerp, like torch)
    dampening=False: m ← mom·m + g            (SGD momentum, torch's dampening=0)
    """

    dampening: bool = False
    state_names: ClassVar[tuple[str, ...]] = ("grad_avg",)

    def init_state(self, p: Tensor) -> dict[str, Any]:
        return {"grad_avg": torch.zeros_like(p)}

    def update(self, params: list[Tensor], grads: list[Tensor], *, mom: float,
               grad_avg: list[Tensor]) -> None:
        if self.dampening:
            torch._foreach_lerp_(grad_avg, grads, 1 - mom)
        else:
            torch._foreach_mul_(grad_avg, mom)
            torch._foreach_add_(grad_avg, grads)


@dataclass(frozen=True)
class AverageSqrGrad:
    """Running average of the squared gradient, ``sqr_avg``: v ← sqr_mom·v + (1 − sqr_mom)·g²."""

    dampening: bool = True
    state_names: ClassVar[tuple[str, ...]] = ("sqr_avg",)

    def init_state(self, p: Tensor) -> dict[str, Any]:
        return {"sqr_avg": torch.zeros_like(p)}

    def update(self, params: list[Tensor], grads: list[Tensor], *, sqr_mom: float,
               sqr_avg: list[Tensor]) -> None:
        torch._foreach_mul_(sqr_avg, sqr_mom)
        torch._foreach_addcmul_(sqr_avg, grads, grads, value=1 - sqr_mom if self.dampening else 1)


@dataclass(frozen=True)
class StepCount:
    """Number of steps each parameter has taken, ``step`` (a Python int: bias corrections need
    it on the host, and an int costs no device sync)."""

    state_names: ClassVar[tuple[str, ...]] = ("step",)

    def init_state(self, p: Tensor) -> dict[str, Any]:
        return {"step": 0}

    def update(self, params: list[Tensor], grads: list[Tensor], *, step: list[int]) -> None:
        step[:] = [n + 1 for n in step]  # the Optimizer writes non-tensor state back


@dataclass(frozen=True)
class L2Penalty:
    """L2 regularisation, g ← g + wd·p. Listed first among the stats so that momentum and the
    squared-gradient average see the penalised gradient (the course ran it after them)."""

    state_names: ClassVar[tuple[str, ...]] = ()

    def init_state(self, p: Tensor) -> dict[str, Any]:
        return {}

    def update(self, params: list[Tensor], grads: list[Tensor], *,
               wd: float = 0.0) -> list[Tensor] | None:
        if wd == 0:
            return None
        return torch._foreach_add(grads, params, alpha=wd)  # new tensors: p.grad stays as is


@dataclass(frozen=True)
class TrustScaledMomentum:
    """LARS momentum (You et al. 2017, Algorithm 1): v ← mom·v + q·(g + wd·p), with the layer's
    trust ratio q = trust_coeff·‖p‖ / (‖g‖ + wd·‖p‖ + eps), and q = 1 when either norm is 0 so a
    zero-initialised parameter still moves (as NVIDIA's LARC does)."""

    state_names: ClassVar[tuple[str, ...]] = ("grad_avg",)

    def init_state(self, p: Tensor) -> dict[str, Any]:
        return {"grad_avg": torch.zeros_like(p)}

    def update(self, params: list[Tensor], grads: list[Tensor], *, mom: float, wd: float,
               trust_coeff: float, eps: float, grad_avg: list[Tensor]) -> None:
        p_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = trust_coeff * p_norm / (g_norm + wd * p_norm + eps)
        ratio = torch.where((p_norm > 0) & (g_norm > 0), ratio, 1.0)
        penalised = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
        scaled = torch._foreach_mul(penalised, list(ratio.unbind()))
        torch._foreach_mul_(grad_avg, mom)
        torch._foreach_add_(grad_avg, scaled)


@dataclass(frozen=True)
class SlowWeights:
    """Lookahead's slow copy of each parameter, ``slow_weights``, taken before its first step."""

    state_names: ClassVar[tuple[str, ...]] = ("slow_weights",)

    def init_state(self, p: Tensor) -> dict[str, Any]:
        return {"slow_weights": p.detach().clone()}

    def update(self, params: list[Tensor], grads: list[Tensor]) -> None:
        return None


# --------------------------------------------------------------------------- steppers


def by_step(step: list[int], *lists: list[Any]) -> Iterator[tuple[Any, ...]]:
    """Yield ``(n, *sublists)`` for each distinct step count ``n``.

    Bias corrections depend on the step count; usually every parameter of a group has taken the
    same number of steps, so this yields the whole lists once and the corrections are scalars.
    """
    first = step[0]
    if step.count(first) == len(step):
        yield (first, *lists)
        return
    chunks: dict[int, list[int]] = {}
    for i, n in enumerate(step):
        chunks.setdefault(n, []).append(i)
    for n, idx in chunks.items():
        yield (n, *([values[i] for i in idx] for values in lists))


def sgd_step(params: list[Tensor], grads: list[Tensor], *, lr: float) -> None:
    """p ← p − lr·g"""
    torch._foreach_add_(params, grads, alpha=-lr)


def momentum_step(params: list[Tensor], grads: list[Tensor], *, lr: float,
                  grad_avg: list[Tensor]) -> None:
    """p ← p − lr·m"""
    torch._foreach_add_(params, grad_avg, alpha=-lr)


def decoupled_weight_decay(params: list[Tensor], grads: list[Tensor], *, lr: float,
                           wd: float = 0.0) -> None:
    """p ← p·(1 − lr·wd), listed before the update stepper (AdamW's decoupled weight decay)."""
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)


def adam_step(params: list[Tensor], grads: list[Tensor], *, lr: float, mom: float,
              sqr_mom: float, eps: float, grad_avg: list[Tensor], sqr_avg: list[Tensor],
              step: list[int]) -> None:
    """p ← p − lr·m̂ / (√v̂ + eps), with m̂ = m/(1 − mom^t) and v̂ = v/(1 − sqr_mom^t)."""
    for n, p, m, v in by_step(step, params, grad_avg, sqr_avg):
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1 - sqr_mom**n) ** 0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, -lr / (1 - mom**n))


def rms_prop_step(params: list[Tensor], grads: list[Tensor], *, lr: float, eps: float,
                  sqr_avg: list[Tensor]) -> None:
    """p ← p − lr·g / (√v + eps)"""
    denom = torch._foreach_sqrt(sqr_avg)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, grads, denom, -lr)


def rms_prop_momentum_step(params: list[Tensor], grads: list[Tensor], *, lr: float, eps: float,
                           grad_avg: list[Tensor], sqr_avg: list[Tensor]) -> None:
    """p ← p − lr·m / (√v + eps), m the undampened average of raw gradients (fastai's form)."""
    rms_prop_step(params, grad_avg, lr=lr, eps=eps, sqr_avg=sqr_avg)


def radam_rectifier(n: int, sqr_mom: float, threshold: float) -> float:
    """RAdam's variance rectification r_t at step n, or 0.0 while ρ_t ≤ threshold."""
    rho_inf = 2 / (1 - sqr_mom) - 1
    rho = rho_inf - 2 * n * sqr_mom**n / (1 - sqr_mom**n)
    if rho <= threshold:
        return 0.0
    return math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))


def radam_step(params: list[Tensor], grads: list[Tensor], *, lr: float, mom: float,
               sqr_mom: float, eps: float, rect_threshold: float, grad_avg: list[Tensor],
               sqr_avg: list[Tensor], step: list[int]) -> None:
    """RAdam (Liu et al. 2020): while the variance of the adaptive rate is intractable
    (ρ_t ≤ rect_threshold) p ← p − lr·m̂; after that p ← p − lr·r_t·m̂·√(1 − sqr_mom^t)/(√v + eps).
    eps sits where torch.optim.RAdam and the authors' code put it (the paper has none)."""
    for n, p, m, v in by_step(step, params, grad_avg, sqr_avg):
        rect = radam_rectifier(n, sqr_mom, rect_threshold)
        step_size = lr / (1 - mom**n)
        if rect == 0.0:
            torch._foreach_add_(p, m, alpha=-step_size)
            continue
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, -step_size * rect * (1 - sqr_mom**n) ** 0.5)


def lamb_step(params: list[Tensor], grads: list[Tensor], *, lr: float, mom: float,
              sqr_mom: float, eps: float, wd: float, grad_avg: list[Tensor],
              sqr_avg: list[Tensor], step: list[int]) -> None:
    """LAMB (You et al. 2019, Algorithm 2): r = m̂/(√v̂ + eps), u = r + wd·p,
    p ← p − lr·q·u with the layer trust ratio q = ‖p‖/‖u‖, 1 when either norm is 0, at most 10."""
    for n, p, m, v in by_step(step, params, grad_avg, sqr_avg):
        # With c = √bc2/bc1: m̂/(√v̂ + eps) = c·m/(√v + eps·√bc2), so u = c·u' with
        # u' = m/(√v + eps·√bc2) + (wd/c)·p, built in the one buffer this step allocates (a second
        # one made the CPU allocator hand memory back and fault it in again every step).
        bc1, bc2_sqrt = 1 - mom**n, (1 - sqr_mom**n) ** 0.5
        c = bc2_sqrt / bc1
        u = torch._foreach_sqrt(v)
        torch._foreach_add_(u, eps * bc2_sqrt)
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, m)
        if wd != 0:
            torch._foreach_add_(u, p, alpha=wd / c)
        p_norm = torch.stack(torch._foreach_norm(p))
        u_norm = torch.stack(torch._foreach_norm(u)).mul_(c)
        trust = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)
        trust = trust.clamp_(max=LAMB_MAX_TRUST).mul_(-lr * c)
        torch._foreach_addcmul_(p, u, list(trust.unbind()))


def lookahead_step(params: list[Tensor], grads: list[Tensor], *, k: int, alpha: float,
                   step: list[int], slow_weights: list[Tensor]) -> None:
    """Lookahead (Zhang et al. 2019): every k steps slow ← slow + alpha·(fast − slow),
    fast ← slow."""
    due = [i for i, n in enumerate(step) if n % k == 0]
    if not due:
        return
    fast = [params[i] for i in due]
    slow = [slow_weights[i] for i in due]
    torch._foreach_lerp_(slow, fast, alpha)
    torch._foreach_copy_(fast, slow)
