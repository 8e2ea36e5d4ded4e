"""trainer.optim against oracles: torch.optim, and the LAMB and RAdam papers transcribed here.

Oracle runs are teacher-forced: a small CNN computes real gradients on real batches for 200 steps,
and the oracle's copy of the parameters receives the same gradients. Comparing optimizers this way
isolates their arithmetic; letting each copy compute its own gradients would let the network
amplify a one-ulp rounding difference (torch's own foreach and single-tensor RAdam differ in the
last bit) into percent-level drift and hide whether the formulas agree.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.optim import (
    Optimizer,
    adam,
    lamb,
    lars,
    radam,
    ranger,
    rms_prop,
    sgd,
)
from trainer.steppers import (
    radam_rectifier,
)

STEPS = 200
REL_TOL = 1e-6  # max |ours − oracle| over a tensor, relative to that tensor's largest magnitude


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def make_batches(n: int = 4, bs: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 3, 12, 12, generator=gen), torch.randint(0, 10, (bs,), generator=gen))
            for _ in range(n)]


BATCHES = make_batches()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and fair to tests running beside us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backward(model: nn.Module, i: int) -> torch.Tensor:
    x, y = BATCHES[i % len(BATCHES)]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def twin_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in model.parameters()]


def teacher_forced(make_ours, make_oracle, steps: int = STEPS, before_step=None):
    """Step ours and the oracle side by side on the same real gradients."""
    model = small_cnn()
    start = twin_of(model)
    twin = twin_of(model)
    ours, oracle = make_ours(model.parameters()), make_oracle(twin)
    for i in range(steps):
        ours.zero_grad()
        backward(model, i)
        if before_step is not None:
            before_step(i, list(model.parameters()))
        for p, q in zip(model.parameters(), twin, strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        ours.step()
        oracle.step()
    return list(model.parameters()), twin, start, ours, oracle


def assert_matches(ours: list[torch.Tensor], oracle: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, oracle, strict=True)):
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        assert diff <= REL_TOL * scale, f"{what} {i}: max diff {diff:.3g} vs scale {scale:.3g}"


def assert_moved(params: list[torch.Tensor], start: list[torch.Tensor]) -> None:
    """Guard against a vacuous comparison: training must have changed the weights."""
    moved = max(((p - s).abs().max() / s.abs().max()).item()
                for p, s in zip(params, start, strict=True) if s.abs().max() > 0)
    assert moved > 0.05


def torch_state(oracle: torch.optim.Optimizer, params: list[torch.Tensor], key: str):
    return [oracle.state[p][key] for p in params]


def our_state(opt: Optimizer, key: str):
    return [opt.state[p][key] for group in opt.param_groups for p in group["params"]]


# --------------------------------------------------------------------------- torch.optim oracles

TORCH_ORACLES = {
    "sgd": (lambda p: sgd(p, 0.05),
            lambda p, fe: torch.optim.SGD(p, 0.05, foreach=fe), {}),
    "sgd-momentum": (lambda p: sgd(p, 0.05, mom=0.9),
                     lambda p, fe: torch.optim.SGD(p, 0.05, momentum=0.9, foreach=fe),
                     {"grad_avg": "momentum_buffer"}),
    "sgd-momentum-l2": (
        lambda p: sgd(p, 0.05, mom=0.9, wd=1e-2, decouple_wd=False),
        lambda p, fe: torch.optim.SGD(p, 0.05, momentum=0.9, weight_decay=1e-2, foreach=fe),
        {"grad_avg": "momentum_buffer"}),
    "adam-l2": (
        lambda p: adam(p, 3e-3, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=1e-2, decouple_wd=False),
        lambda p, fe: torch.optim.Adam(p, 3e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2,
                                       foreach=fe),
        {"grad_avg": "exp_avg", "sqr_avg": "exp_avg_sq"}),
    "adamw": (
        lambda p: adam(p, 3e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.1),
        lambda p, fe: torch.optim.AdamW(p, 3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                        foreach=fe),
        {"grad_avg": "exp_avg", "sqr_avg": "exp_avg_sq"}),
    "rmsprop-l2": (
        lambda p: rms_prop(p, 1e-3, sqr_mom=0.99, eps=1e-8, wd=1e-2, decouple_wd=False),
        lambda p, fe: torch.optim.RMSprop(p, 1e-3, alpha=0.99, eps=1e-8, weight_decay=1e-2,
                                          foreach=fe),
        {"sqr_avg": "square_avg"}),
    # lr 1e-3: at 3e-3 torch's own foreach and single-tensor RAdam drift 1.3e-6 apart (rounding)
    "radam-l2": (
        lambda p: radam(p, 1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=1e-2, decouple_wd=False),
        lambda p, fe: torch.optim.RAdam(p, 1e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2,
                                        foreach=fe),
        {"grad_avg": "exp_avg", "sqr_avg": "exp_avg_sq"}),
    "radam-decoupled": (
        lambda p: radam(p, 1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.1),
        lambda p, fe: torch.optim.RAdam(p, 1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                        decoupled_weight_decay=True, foreach=fe),
        {"grad_avg": "exp_avg", "sqr_avg": "exp_avg_sq"}),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name", list(TORCH_ORACLES))
def test_matches_torch_optim(name: str, foreach: bool) -> None:
    make_ours, make_torch, state_keys = TORCH_ORACLES[name]
    ours, theirs, start, opt, oracle = teacher_forced(make_ours, lambda p: make_torch(p, foreach))
    assert_moved(ours, start)
    assert_matches(ours, theirs, f"{name} param")
    for our_key, torch_key in state_keys.items():
        assert_matches(our_state(opt, our_key), torch_state(oracle, theirs, torch_key), our_key)
    if "step" in opt.state[ours[0]]:
        assert our_state(opt, "step") == [int(s) for s in torch_state(oracle, theirs, "step")]


def test_skipped_parameters_match_torch_per_parameter_step_counts() -> None:
    """A layer without gradients for its first 50 steps is skipped; its bias corrections then use
    its own step count (torch keeps one per parameter too)."""

    def freeze_first_conv(i: int, params: list[torch.Tensor]) -> None:
        if i < 50:
            params[0].grad = params[1].grad = None

    ours, theirs, start, opt, _ = teacher_forced(
        lambda p: adam(p, 3e-3, wd=1e-2),
        lambda p: torch.optim.AdamW(p, 3e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2),
        before_step=freeze_first_conv)
    assert_moved(ours, start)
    assert_matches(ours, theirs, "param")
    assert opt.state[ours[0]]["step"] == STEPS - 50
    assert opt.state[ours[2]]["step"] == STEPS


# --------------------------------------------------------------------------- paper transcriptions


class PaperLamb:
    """You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2, line by line,
    with one loop per layer. φ is the identity; the trust ratio is 1 when either norm is 0 and is
    capped at 10 (the safeguards NVIDIA's and fastai's LAMB use)."""

    def __init__(self, params, lr, beta1, beta2, eps, wd):
        self.params, self.lr, self.b1, self.b2 = params, lr, beta1, beta2
        self.eps, self.wd = eps, wd
        self.m = [torch.zeros_like(x) for x in params]
        self.v = [torch.zeros_like(x) for x in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        for x, m, v in zip(self.params, self.m, self.v, strict=True):
            g = x.grad
            m.copy_(b1 * m + (1 - b1) * g)
            v.copy_(b2 * v + (1 - b2) * g * g)
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            r = m_hat / (v_hat.sqrt() + self.eps)
            u = r + self.wd * x
            x_norm, u_norm = torch.linalg.vector_norm(x), torch.linalg.vector_norm(u)
            trust = 1.0 if x_norm == 0 or u_norm == 0 else min((x_norm / u_norm).item(), 10.0)
            x.sub_(self.lr * trust * u)


class PaperRAdam:
    """Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond", Algorithm 2,
    line by line: no eps, rectification once ρ_t > 4."""

    def __init__(self, params, lr, beta1, beta2):
        self.params, self.lr, self.b1, self.b2 = params, lr, beta1, beta2
        self.m = [torch.zeros_like(x) for x in params]
        self.v = [torch.zeros_like(x) for x in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
        for x, m, v in zip(self.params, self.m, self.v, strict=True):
            g = x.grad
            v.copy_(b2 * v + (1 - b2) * g * g)
            m.copy_(b1 * m + (1 - b1) * g)
            m_hat = m / (1 - b1**t)
            if rho_t > 4:
                l_t = ((1 - b2**t) / v).sqrt()
                r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                                / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                x.sub_(self.lr * r_t * m_hat * l_t)
            else:
                x.sub_(self.lr * m_hat)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_matches_paper_algorithm_2(wd: float) -> None:
    ours, theirs, start, _, _ = teacher_forced(
        lambda p: lamb(p, 2e-3, mom=0.9, sqr_mom=0.99, eps=1e-6, wd=wd),
        lambda p: PaperLamb(p, 2e-3, 0.9, 0.99, 1e-6, wd))
    assert_moved(ours, start)
    assert_matches(ours, theirs, "param")


def test_radam_with_paper_threshold_and_no_eps_matches_paper_algorithm_2() -> None:
    """tench's radam defaults follow torch (rectify once ρ_t > 5, eps added to √v); with
    rect_threshold=4 and eps=0 it is the paper's algorithm."""
    ours, theirs, start, _, _ = teacher_forced(
        lambda p: radam(p, 1e-3, mom=0.9, sqr_mom=0.99, eps=0.0, wd=0.0, rect_threshold=4.0),
        lambda p: PaperRAdam(p, 1e-3, 0.9, 0.99))
    assert all(torch.isfinite(p).all() for p in ours)
    assert_moved(ours, start)
    assert_matches(ours, theirs, "param")


def test_radam_threshold_is_where_torch_and_the_paper_differ() -> None:
    assert radam_rectifier(5, 0.99, threshold=5.0) == 0.0  # ρ_5 ≈ 4.96: torch still unrectified
    assert radam_rectifier(5, 0.99, threshold=4.0) > 0.0  # the paper rectifies already
    assert radam_rectifier(6, 0.99, threshold=5.0) > 0.0
    paper, _, _, _, _ = teacher_forced(lambda p: radam(p, 1e-3, eps=0.0, rect_threshold=4.0),
                                       lambda p: sgd(p, 0.0), steps=5)
    torchlike, _, _, _, _ = teacher_forced(lambda p: radam(p, 1e-3, eps=0.0),
                                           lambda p: sgd(p, 0.0), steps=5)
    assert any(not torch.equal(a, b) for a, b in zip(paper, torchlike, strict=True))


# --------------------------------------------------------------------------- LAMB safeguards


def one_step(opt_func, values: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    p = values.clone().requires_grad_()
    p.grad = grad.clone()
    opt_func([p]).step()
    return p.detach()


def test_lamb_moves_a_zero_initialised_parameter() -> None:
    """The course's LAMB had trust ratio ‖p‖/‖u‖ = 0 for zero weights, so they never moved."""
    after = one_step(lambda p: lamb(p, 0.1), torch.zeros(4), torch.tensor([1.0, -2.0, 3.0, 4.0]))
    # First Adam step: m̂/(√v̂ + eps) ≈ sign(g); trust ratio 1.
    torch.testing.assert_close(after, -0.1 * torch.tensor([1.0, -1.0, 1.0, 1.0]), rtol=1e-5,
                               atol=1e-6)


def test_lamb_trust_ratio_is_capped_at_10() -> None:
    values = torch.full((4,), 100.0)
    after = one_step(lambda p: lamb(p, 0.1), values, torch.ones(4))
    # ‖p‖/‖u‖ = 200/2 = 100, capped at 10: each weight moves by lr·10·1.
    torch.testing.assert_close(values - after, torch.ones(4), rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- convergence


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


RECIPES = {  # recipe, steps, decay lr linearly to 0 (LAMB's steps scale with ‖p‖: it must)
    "sgd": (lambda p: sgd(p, 2e-3), 6_000, False),
    "sgd-momentum": (lambda p: sgd(p, 4e-4, mom=0.9), 5_000, False),
    "adam": (lambda p: adam(p, 2e-2, wd=0.0), 3_000, False),
    "adam-l2": (lambda p: adam(p, 2e-2, wd=1e-5, decouple_wd=False), 3_000, False),
    "rms_prop": (lambda p: rms_prop(p, 2e-3), 5_000, False),
    "rms_prop-momentum": (lambda p: rms_prop(p, 3e-4, mom=0.9), 3_000, False),
    "radam": (lambda p: radam(p, 5e-3), 3_000, False),
    "lamb": (lambda p: lamb(p, 5e-2), 3_000, True),
    "lars": (lambda p: lars(p, 0.05, trust_coeff=0.02), 3_000, False),
    "ranger": (lambda p: ranger(p, 5e-3, wd=0.0), 3_000, False),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_converges_on_rosenbrock(name: str) -> None:
    make, steps, decay = RECIPES[name]
    xy = torch.tensor([-1.5, 2.0], requires_grad=True)
    opt = make([xy])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps if decay else 1.0)
    start = rosenbrock(xy).item()
    for _ in range(steps):
        opt.zero_grad()
        rosenbrock(xy).backward()
        opt.step()
        schedule.step()
    assert rosenbrock(xy).item() < 1e-3 * start
    torch.testing.assert_close(xy.detach(), torch.ones(2), atol=0.05, rtol=0)
