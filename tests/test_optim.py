"""trainer.optim against oracles: torch.optim, and the LAMB and RAdam papers transcribed here.

Oracle runs are teacher-forced: a small CNN computes real gradients on real batches for 200 steps,
and the oracle's copy of the parameters receives the same gradients. Comparing optimizers this way
isolates their arithmetic; letting each copy compute its own gradients would let the network
amplify a one-ulp rounding difference (torch's own foreach and single-tensor RAdam differ in the
last bit) into percent-level drift and hide whether the formulas agree.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.optim import (
    Optimizer,
    _chunks,
    adam,
    lamb,
    lars,
    lookahead,
    radam,
    ranger,
    rms_prop,
    sgd,
    spread,
)
from trainer.steppers import (
    AverageGrad,
    AverageSqrGrad,
    StepCount,
    adam_step,
    decoupled_weight_decay,
    sgd_step,
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


@pytest.mark.parametrize("make", [lambda p: sgd(p, 0.05, mom=0.9, wd=0.01),
                                  lambda p: adam(p, 3e-3, wd=0.01, decouple_wd=False),
                                  lambda p: lamb(p, 3e-3, wd=0.01), lambda p: lars(p, 0.1),
                                  lambda p: ranger(p, 3e-3, k=3)],
                         ids=["sgd", "adam-l2", "lamb", "lars", "ranger"])
def test_cpu_chunks_step_exactly_like_the_whole_group(make) -> None:
    """On a CPU a group is stepped in cache-sized chunks of tensors; the numbers must not change,
    also when parameters have different step counts."""

    def in_small_chunks(params):
        opt = make(params)
        opt.cpu_chunk_numel = 100
        return opt

    def freeze_first_conv(i: int, params: list[torch.Tensor]) -> None:
        if i < 4:
            params[0].grad = params[1].grad = None

    chunked, whole, start, opt, _ = teacher_forced(in_small_chunks, make, steps=20,
                                                   before_step=freeze_first_conv)
    assert len(_chunks(chunked, opt.cpu_chunk_numel)) >= 4
    assert len(_chunks(whole, make(whole).cpu_chunk_numel)) == 1
    for a, b in zip(chunked, whole, strict=True):
        assert torch.equal(a, b)


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
    """ρ_5 ≈ 4.96 (test_steppers.py): the paper rectifies at step 5, torch from step 6."""
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


# --------------------------------------------------------------------------- state_dict


def train(model: nn.Module, opt, steps: range) -> None:
    for i in steps:
        opt.zero_grad()
        backward(model, i)
        opt.step()


@pytest.mark.parametrize("make", [lambda p: adam(p, 3e-3), lambda p: lamb(p, 3e-3, wd=0.01),
                                  lambda p: ranger(p, 3e-3), lambda p: sgd(p, 0.05, mom=0.9)],
                         ids=["adam", "lamb", "ranger", "sgd-momentum"])
def test_resume_from_state_dict_is_bit_identical(make) -> None:
    model = small_cnn()
    opt = make(model.parameters())
    train(model, opt, range(7))  # ranger: one lookahead sync behind it, one still ahead
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, range(7, 15))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = small_cnn(seed=1)
    resumed.load_state_dict(saved["model"])
    fresh = make(resumed.parameters())
    for group in fresh.param_groups:
        group["lr"] = 123.0  # overwritten by the saved hyper-parameters
    fresh.load_state_dict(saved["opt"])
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    train(resumed, fresh, range(7, 15))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_lists_state_by_position_with_hypers() -> None:
    model = small_cnn()
    opt = ranger(model.parameters(), 1e-3)
    train(model, opt, range(2))
    saved = opt.state_dict()
    n_params = len(list(model.parameters()))
    assert sorted(saved["state"]) == list(range(n_params))
    assert set(saved["state"][0]) == {"grad_avg", "sqr_avg", "step", "slow_weights"}
    assert saved["state"][0]["step"] == 2
    group = saved["param_groups"][0]
    assert group["params"] == list(range(n_params))
    assert {"lr", "mom", "sqr_mom", "eps", "wd", "rect_threshold", "k", "alpha"} <= set(group)


def test_loaded_state_is_not_shared_with_the_source() -> None:
    model = small_cnn()
    opt = adam(model.parameters(), 1e-3)
    train(model, opt, range(1))
    twin = adam(twin_of(model), 1e-3)
    twin.load_state_dict(opt.state_dict())
    first = next(iter(model.parameters()))
    before = opt.state[first]["grad_avg"].clone()
    for state in twin.state.values():
        state["grad_avg"].add_(1.0)
    assert torch.equal(opt.state[first]["grad_avg"], before)


def test_loading_state_from_a_different_optimizer_fails_clearly() -> None:
    model = small_cnn()
    opt = sgd(model.parameters(), 0.1, mom=0.9)
    train(model, opt, range(1))
    with pytest.raises(ValueError, match="no value for .*sqr_mom"):
        adam(twin_of(model), 1e-3).load_state_dict(opt.state_dict())
    other = adam(twin_of(model), 1e-3)
    saved = other.state_dict()  # adam's hyper-parameters with sgd's per-parameter state
    saved["state"] = opt.state_dict()["state"]
    with pytest.raises(ValueError, match="parameter 0 has \\['grad_avg'\\]"):
        other.load_state_dict(saved)


# --------------------------------------------------------------------------- hyper-parameter names

ADAM_STATS = [AverageGrad(dampening=True), AverageSqrGrad(), StepCount()]


def test_misspelt_hyper_parameter_fails_at_construction() -> None:
    params = twin_of(small_cnn())
    with pytest.raises(ValueError, match="unknown hyper-parameter 'mom_sqr'.*mean 'sqr_mom'"):
        Optimizer(params, [adam_step], ADAM_STATS, lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5,
                  mom_sqr=0.99)
    with pytest.raises(ValueError, match="'mom_sqr' in param group 0"):
        Optimizer([{"params": params, "mom_sqr": 0.9}], [adam_step], ADAM_STATS,
                  lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5)
    with pytest.raises(TypeError, match="mom_sqr"):
        adam(params, 1e-3, mom_sqr=0.99)


def test_missing_hyper_parameter_or_state_names_its_user() -> None:
    params = twin_of(small_cnn())
    with pytest.raises(ValueError, match="'sqr_mom' \\(needed by AverageSqrGrad\\)"):
        Optimizer(params, [adam_step], ADAM_STATS, lr=1e-3, mom=0.9, eps=1e-5)
    # No StepCount stat: 'step' is neither state nor a given hyper-parameter.
    with pytest.raises(ValueError, match="'step' \\(needed by adam_step\\)"):
        Optimizer(params, [adam_step], ADAM_STATS[:2], lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5)
    with pytest.raises(ValueError, match="kept by both"):
        Optimizer(params, [sgd_step], [AverageGrad(), AverageGrad()], lr=0.1, mom=0.9)
    with pytest.raises(TypeError, match="must take \\(params, grads"):
        Optimizer(params, [lambda p, *, lr: None], lr=0.1)


def test_keyword_defaults_of_steppers_become_hypers() -> None:
    params = twin_of(small_cnn())
    opt = Optimizer(params, [decoupled_weight_decay, sgd_step], lr=0.1)
    assert opt.param_groups[0]["wd"] == 0.0
    assert opt.hyper_names == {"lr", "wd"}

    def decay_a_lot(params, grads, *, lr, wd=0.5):
        pass

    with pytest.raises(ValueError, match="disagree on the default of 'wd'"):
        Optimizer(params, [decoupled_weight_decay, decay_a_lot, sgd_step], lr=0.1)
    assert Optimizer(params, [decoupled_weight_decay, decay_a_lot, sgd_step], lr=0.1,
                     wd=0.1).param_groups[0]["wd"] == 0.1


# --------------------------------------------------------------------------- param groups


def three_groups() -> list[list[torch.Tensor]]:
    return [[torch.ones(3, requires_grad=True)] for _ in range(3)]


def test_slice_spreads_log_evenly_over_groups() -> None:
    opt = sgd(three_groups(), lr=slice(1e-4, 1e-2), mom=[0.8, 0.85, 0.9])
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == 1e-4 and lrs[2] == 1e-2
    assert lrs[1] == pytest.approx(1e-3, rel=1e-12)
    assert [g["mom"] for g in opt.param_groups] == [0.8, 0.85, 0.9]
    assert spread("lr", slice(1e-4, 1e-2), 1) == [1e-2]
    with pytest.raises(ValueError, match="2 values for 3 param groups"):
        sgd(three_groups(), lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="slice\\(lo, hi\\)"):
        sgd(three_groups(), lr=slice(0.1))


def test_each_group_steps_with_its_own_hypers_and_params_without_grad_are_skipped() -> None:
    a, b, frozen = (torch.full((3,), 2.0, requires_grad=True) for _ in range(3))
    opt = sgd([{"params": [a], "lr": 0.1}, {"params": [b, frozen]}], lr=0.01, wd=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    # decoupled decay first, then the step: p·(1 − lr·wd) − lr·g
    assert torch.equal(a.detach(), torch.full((3,), 2.0 * (1 - 0.1 * 0.5) - 0.1))
    assert torch.equal(b.detach(), torch.full((3,), 2.0 * (1 - 0.01 * 0.5) - 0.01))
    assert torch.equal(frozen.detach(), torch.full((3,), 2.0))

    assert not opt.state  # plain SGD keeps no per-parameter state

    state_opt = adam([a, b, frozen], 1e-3)
    state_opt.step()
    assert frozen not in state_opt.state and state_opt.state[a]["step"] == 1


def test_groups_from_lists_of_lists_and_generators() -> None:
    model = small_cnn()
    body, head = list(model[:-1].parameters()), list(model[-1].parameters())
    opt = adam([body, head], lr=slice(1e-4, 1e-3))
    assert [len(g["params"]) for g in opt.param_groups] == [len(body), len(head)]
    assert len(adam(model.parameters(), 1e-3).param_groups) == 1
    with pytest.raises(ValueError, match="empty parameter list"):
        adam([], 1e-3)


# --------------------------------------------------------------------------- torch interplay


def test_grad_scaler_unscale_and_clip_grad_norm_work_unchanged() -> None:
    """Scaling by a power of two is exact, so the scaled run must equal the plain one bit for bit
    — which only holds if GradScaler unscaled exactly our param_groups."""
    plain, scaled = small_cnn(), small_cnn()
    plain_opt, scaled_opt = adam(plain.parameters(), 3e-3), adam(scaled.parameters(), 3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for i in range(5):
        plain_opt.zero_grad()
        backward(plain, i)
        nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        plain_opt.step()

        scaled_opt.zero_grad()
        x, y = BATCHES[i % len(BATCHES)]
        scaler.scale(F.cross_entropy(scaled(x), y)).backward()
        scaler.unscale_(scaled_opt)
        nn.utils.clip_grad_norm_(scaled.parameters(), 0.5)
        scaler.step(scaled_opt)
        scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)

    # An overflowing gradient: the step is skipped, nothing moves, no state advances.
    before = [p.detach().clone() for p in scaled.parameters()]
    scaled_opt.zero_grad()
    scaler.scale(backward_loss(scaled, 0)).backward()
    first = next(iter(scaled.parameters()))
    first.grad[0] = float("inf")
    scaler.step(scaled_opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(scaled.parameters(), before, strict=True))
    assert scaled_opt.state[first]["step"] == 5
    assert scaler.get_scale() == 2.0**11


def backward_loss(model: nn.Module, i: int) -> torch.Tensor:
    x, y = BATCHES[i % len(BATCHES)]
    return F.cross_entropy(model(x), y)


def test_torch_lr_scheduler_drives_our_param_groups() -> None:
    def with_schedule(opt):
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
        return opt, schedule

    model = small_cnn()
    twin = twin_of(model)
    ours, our_schedule = with_schedule(sgd(model.parameters(), 0.1, mom=0.9))
    theirs, their_schedule = with_schedule(torch.optim.SGD(twin, 0.1, momentum=0.9))
    for i in range(6):
        ours.zero_grad()
        backward(model, i)
        for p, q in zip(model.parameters(), twin, strict=True):
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        our_schedule.step()
        their_schedule.step()
        assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] == 0.1 * 0.5 ** (i + 1)
    for a, b in zip(model.parameters(), twin, strict=True):
        assert torch.equal(a, b)


def test_hypers_set_through_param_groups_take_effect() -> None:
    """How the Learner's schedules talk to the optimizer: opt.param_groups[i]['mom'] = ..."""

    def change_mom(i: int, params) -> None:
        if i == 100:
            opt.param_groups[0]["mom"] = 0.5
            oracle.param_groups[0]["betas"] = (0.5, 0.99)

    def make_ours(params):
        nonlocal opt
        opt = adam(params, 3e-3)
        return opt

    def make_oracle(params):
        nonlocal oracle
        oracle = torch.optim.AdamW(params, 3e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
        return oracle

    opt = oracle = None
    ours, theirs, start, _, _ = teacher_forced(make_ours, make_oracle, before_step=change_mom)
    assert_matches(ours, theirs, "param")
    plain, _, _, _, _ = teacher_forced(lambda p: adam(p, 3e-3), lambda p: sgd(p, 0.0))
    assert any(not torch.equal(a, b) for a, b in zip(ours, plain, strict=True))


def test_zero_grad_closure_and_deepcopy() -> None:
    model = small_cnn()
    opt = adam(model.parameters(), 1e-3)
    loss = opt.step(lambda: backward(model, 0))
    assert loss.item() > 0 and opt.state[next(iter(model.parameters()))]["step"] == 1
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    model2, opt2 = copy.deepcopy((model, opt))
    train(model, opt, range(1, 4))
    train(model2, opt2, range(1, 4))
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- lookahead, LARS


def test_lookahead_matches_its_transcription() -> None:
    """SGD fast weights; every k steps slow ← slow + alpha·(fast − slow), fast ← slow."""
    model = small_cnn()
    twin = twin_of(model)
    slow = [p.detach().clone() for p in twin]
    opt = lookahead(sgd(model.parameters(), 0.05), k=3, alpha=0.5)
    fast_opt = sgd(twin, 0.05)
    for i in range(10):
        opt.zero_grad()
        backward(model, i)
        for p, q in zip(model.parameters(), twin, strict=True):
            q.grad = p.grad.clone()
        opt.step()
        fast_opt.step()
        if (i + 1) % 3 == 0:
            with torch.no_grad():
                for s, q in zip(slow, twin, strict=True):
                    s.add_(0.5 * (q - s))
                    q.copy_(s)
    assert_matches(list(model.parameters()), twin, "param")
    assert_matches(our_state(opt, "slow_weights"), slow, "slow weights")
    assert set(our_state(opt, "step")) == {10}

    with pytest.raises(ValueError, match="before its first step"):
        lookahead(opt)


def test_lars_step_follows_the_trust_ratio_formula() -> None:
    p = torch.tensor([3.0, 4.0], requires_grad=True)  # ‖p‖ = 5
    p.grad = torch.tensor([0.6, 0.8])  # ‖g‖ = 1
    lars([p], lr=0.1, mom=0.9, wd=0.1, trust_coeff=0.02, eps=0.0).step()
    trust = 0.02 * 5 / (1 + 0.1 * 5)
    expected = torch.tensor([3.0, 4.0]) - 0.1 * trust * (torch.tensor([0.6, 0.8])
                                                         + 0.1 * torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    zero = torch.zeros(2, requires_grad=True)
    zero.grad = torch.ones(2)
    lars([zero], lr=0.1).step()
    assert torch.equal(zero.detach(), torch.full((2,), -0.1))  # trust ratio 1 for ‖p‖ = 0
