"""trainer.steppers: each stat and stepper against one step worked out by hand on tiny tensors.

The optimizers built from them are checked against torch.optim and the papers in test_optim.py;
here each piece is checked alone, so a failure names the piece.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.steppers import (
    LAMB_MAX_TRUST,
    AverageGrad,
    AverageSqrGrad,
    L2Penalty,
    SlowWeights,
    StepCount,
    TrustScaledMomentum,
    adam_step,
    by_step,
    decoupled_weight_decay,
    lamb_step,
    lookahead_step,
    momentum_step,
    radam_rectifier,
    radam_step,
    rms_prop_momentum_step,
    rms_prop_step,
    sgd_step,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- statistics
def test_average_grad_without_dampening_is_sgd_momentum():
    m = [t(1.0, 2.0)]
    AverageGrad().update([t(0, 0)], [t(1.0, -1.0)], mom=0.9, grad_avg=m)
    close(m, [t(0.9 * 1 + 1, 0.9 * 2 - 1)])  # m ← mom·m + g


def test_average_grad_with_dampening_is_adams_first_moment():
    m = [t(1.0, 2.0)]
    AverageGrad(dampening=True).update([t(0, 0)], [t(1.0, -1.0)], mom=0.9, grad_avg=m)
    close(m, [t(0.9 * 1 + 0.1 * 1, 0.9 * 2 + 0.1 * -1)])  # m ← mom·m + (1 − mom)·g


@pytest.mark.parametrize("dampening, weight", [(True, 0.01), (False, 1.0)])
def test_average_sqr_grad(dampening, weight):
    v = [t(1.0, 4.0)]
    AverageSqrGrad(dampening=dampening).update([t(0, 0)], [t(2.0, -1.0)], sqr_mom=0.99,
                                               sqr_avg=v)
    close(v, [t(0.99 * 1 + weight * 4, 0.99 * 4 + weight * 1)])


def test_stats_start_from_zero_state_shaped_like_the_parameter():
    p = t(3.0, 4.0).reshape(2, 1)
    assert torch.equal(AverageGrad().init_state(p)["grad_avg"], torch.zeros(2, 1).double())
    assert torch.equal(AverageSqrGrad().init_state(p)["sqr_avg"], torch.zeros(2, 1).double())
    assert StepCount().init_state(p) == {"step": 0}
    slow = SlowWeights().init_state(p)["slow_weights"]
    assert torch.equal(slow, p) and slow.data_ptr() != p.data_ptr()  # a copy, not a view


def test_step_count_counts_each_parameter_in_place():
    step = [0, 3]
    StepCount().update([t(0), t(0)], [t(0), t(0)], step=step)
    assert step == [1, 4]


def test_l2_penalty_returns_new_gradients_and_leaves_the_old_ones():
    params, grads = [t(1.0, -2.0)], [t(0.5, 0.5)]
    assert L2Penalty().update(params, grads, wd=0.0) is None  # nothing to add: no copies
    penalised = L2Penalty().update(params, grads, wd=0.1)
    close(penalised, [t(0.5 + 0.1 * 1, 0.5 + 0.1 * -2)])  # g ← g + wd·p
    close(grads, [t(0.5, 0.5)])  # p.grad itself is not touched


def test_trust_scaled_momentum_is_lars_algorithm_1():
    params, grads, v = [t(3.0, 4.0), t(0.0, 0.0)], [t(0.0, 1.0), t(2.0, 0.0)], [t(1, 1), t(1, 1)]
    TrustScaledMomentum().update(params, grads, mom=0.9, wd=0.1, trust_coeff=0.001, eps=0.0,
                                 grad_avg=v)
    # first: ‖p‖ = 5, ‖g‖ = 1, q = 0.001·5/(1 + 0.1·5) = 1/300; g + wd·p = (0.3, 1.4)
    q = 0.001 * 5 / (1 + 0.5)
    # second: ‖p‖ = 0, so q = 1 (a zero-initialised weight still moves); g + wd·p = g
    close(v, [t(0.9 + q * 0.3, 0.9 + q * 1.4), t(0.9 + 2.0, 0.9)])


# --------------------------------------------------------------------------- steppers
def test_by_step_yields_whole_lists_when_counts_agree_else_groups():
    a, b = ["p0", "p1", "p2"], ["m0", "m1", "m2"]
    whole = list(by_step([4, 4, 4], a, b))
    assert whole == [(4, a, b)] and whole[0][1] is a  # no copies in the usual case
    assert list(by_step([1, 2, 1], a, b)) == [(1, ["p0", "p2"], ["m0", "m2"]),
                                              (2, ["p1"], ["m1"])]


def test_sgd_step():
    p = [t(1.0, 2.0)]
    sgd_step(p, [t(0.5, -1.0)], lr=0.1)
    close(p, [t(1 - 0.05, 2 + 0.1)])


def test_momentum_step_follows_the_average_not_the_gradient():
    p = [t(1.0, 2.0)]
    momentum_step(p, [t(100.0, 100.0)], lr=0.1, grad_avg=[t(0.5, -1.0)])
    close(p, [t(1 - 0.05, 2 + 0.1)])


def test_decoupled_weight_decay_shrinks_by_lr_times_wd():
    p = [t(1.0, -2.0)]
    decoupled_weight_decay(p, [t(9.0, 9.0)], lr=0.1, wd=0.5)
    close(p, [t(0.95, -1.9)])
    decoupled_weight_decay(p, [t(9.0, 9.0)], lr=0.1)  # wd defaults to 0: unchanged
    close(p, [t(0.95, -1.9)])


def test_adam_step_bias_corrects_per_parameter_step_count():
    # after one step from zero, m = 0.1·g and v = 0.01·g²: m̂ = g, v̂ = g², so p moves lr·sign(g)
    g = t(2.0, -0.5)
    p = [t(1.0, 1.0), t(1.0, 1.0)]
    m = [0.1 * g, 0.1 * g + 0.09 * g]  # the second has taken two steps with the same g
    v = [0.01 * g**2, 0.01 * g**2 + 0.0099 * g**2]
    adam_step(p, [g, g], lr=0.1, mom=0.9, sqr_mom=0.99, eps=0.0, grad_avg=m, sqr_avg=v,
              step=[1, 2])
    close(p, [t(0.9, 1.1), t(0.9, 1.1)])  # both bias corrections give m̂ = g, v̂ = g²
    p = [t(1.0)]
    adam_step(p, [t(0.0)], lr=0.1, mom=0.9, sqr_mom=0.99, eps=1.0, grad_avg=[t(0.1)],
              sqr_avg=[t(0.01)], step=[1])
    close(p, [t(1 - 0.1 * 1 / (1 + 1))])  # eps is added to √v̂: m̂/(√v̂ + eps) = 1/2


def test_rms_prop_steps():
    p = [t(1.0, 1.0)]
    rms_prop_step(p, [t(2.0, -3.0)], lr=0.1, eps=1.0, sqr_avg=[t(4.0, 9.0)])
    close(p, [t(1 - 0.1 * 2 / 3, 1 + 0.1 * 3 / 4)])  # p ← p − lr·g/(√v + eps)
    p = [t(1.0, 1.0)]
    rms_prop_momentum_step(p, [t(99.0, 99.0)], lr=0.1, eps=1.0, grad_avg=[t(2.0, -3.0)],
                           sqr_avg=[t(4.0, 9.0)])
    close(p, [t(1 - 0.1 * 2 / 3, 1 + 0.1 * 3 / 4)])  # the same with m in place of g


def test_radam_rectifier_against_the_formula():
    rho_inf = 2 / (1 - 0.99) - 1  # 199
    rho_5 = rho_inf - 2 * 5 * 0.99**5 / (1 - 0.99**5)
    assert 4.9 < rho_5 < 5.0
    assert radam_rectifier(5, 0.99, threshold=5.0) == 0.0  # ρ_5 ≈ 4.96: torch still unrectified
    assert radam_rectifier(5, 0.99, threshold=4.0) > 0.0  # the paper rectifies already
    rho_6 = rho_inf - 2 * 6 * 0.99**6 / (1 - 0.99**6)
    expected = math.sqrt((rho_6 - 4) * (rho_6 - 2) * rho_inf
                         / ((rho_inf - 4) * (rho_inf - 2) * rho_6))
    assert radam_rectifier(6, 0.99, threshold=5.0) == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < 0.1
    assert radam_rectifier(100_000, 0.99, threshold=5.0) == pytest.approx(1.0, rel=1e-9)


def test_radam_step_before_and_after_rectification():
    # step 1: unrectified, p ← p − lr·m̂ with m̂ = m/(1 − mom)
    p = [t(1.0, 1.0)]
    radam_step(p, [t(0, 0)], lr=0.1, mom=0.9, sqr_mom=0.99, eps=0.0, rect_threshold=5.0,
               grad_avg=[t(0.2, -0.1)], sqr_avg=[t(9.0, 9.0)], step=[1])
    close(p, [t(1 - 0.1 * 2.0, 1 + 0.1 * 1.0)])
    # step 10: rectified, p ← p − lr·r·m̂·√(1 − sqr_mom^n)/(√v + eps)
    n, r = 10, radam_rectifier(10, 0.99, 5.0)
    p = [t(1.0)]
    radam_step(p, [t(0)], lr=0.1, mom=0.9, sqr_mom=0.99, eps=1.0, rect_threshold=5.0,
               grad_avg=[t(0.5)], sqr_avg=[t(4.0)], step=[n])
    m_hat = 0.5 / (1 - 0.9**n)
    close(p, [t(1 - 0.1 * r * m_hat * math.sqrt(1 - 0.99**n) / (2 + 1))])


def test_lamb_step_is_adam_direction_plus_decay_scaled_by_the_trust_ratio():
    p = [t(3.0, 4.0)]
    # one step with g = (1, 1) from zero: m̂ = v̂ = (1, 1), r = m̂/(√v̂ + 0) = (1, 1)
    lamb_step(p, [t(1, 1)], lr=0.1, mom=0.9, sqr_mom=0.99, eps=0.0, wd=0.1,
              grad_avg=[t(0.1, 0.1)], sqr_avg=[t(0.01, 0.01)], step=[1])
    u = t(1 + 0.1 * 3, 1 + 0.1 * 4)  # r + wd·p
    q = 5 / math.sqrt(1.3**2 + 1.4**2)  # ‖p‖/‖u‖
    close(p, [t(3.0, 4.0) - 0.1 * q * u])


def test_lamb_trust_ratio_is_one_for_zero_weights_and_capped():
    p = [t(0.0, 0.0), t(100.0, 100.0)]
    lamb_step(p, [t(1, 1), t(1, 1)], lr=0.1, mom=0.9, sqr_mom=0.99, eps=0.0, wd=0.0,
              grad_avg=[t(0.1, 0.1), t(0.1, 0.1)], sqr_avg=[t(0.01, 0.01), t(0.01, 0.01)],
              step=[1, 1])
    # zero weights: q = 1 (the course's q = 0 never moved them); ‖p‖/‖u‖ = 100: capped at 10
    close(p, [t(-0.1, -0.1), t(100 - 0.1 * LAMB_MAX_TRUST, 100 - 0.1 * LAMB_MAX_TRUST)])


def test_lookahead_pulls_back_only_the_parameters_at_a_multiple_of_k():
    fast, slow = [t(2.0), t(2.0)], [t(0.0), t(0.0)]
    lookahead_step(fast, [t(0), t(0)], k=2, alpha=0.5, step=[1, 2], slow_weights=slow)
    close(fast, [t(2.0), t(1.0)])  # step 1: untouched; step 2: fast ← slow + α·(fast − slow)
    close(slow, [t(0.0), t(1.0)])
    lookahead_step(fast, [t(0), t(0)], k=2, alpha=0.5, step=[3, 3], slow_weights=slow)
    close(fast, [t(2.0), t(1.0)])  # nothing due
