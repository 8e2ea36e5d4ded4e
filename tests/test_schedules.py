"""Schedules: values against the closed-form formulas, combine at its boundaries, round trips."""

from __future__ import annotations

import io
import json
import math
import pickle

import pytest
import torch

from trainer.schedules import (
    CombinedSchedule,
    combine_scheds,
    one_cycle,
    sched_cos,
    sched_exp,
    sched_lin,
    sched_no,
    schedule_from_dict,
    schedule_to_dict,
)


@pytest.mark.parametrize("pos", [0.0, 0.5, 1.0, 0.3])
def test_basic_schedules_match_formulas(pos):
    start, end = 0.2, 1.7
    assert sched_lin(start, end)(pos) == pytest.approx(start + pos * (end - start))
    assert sched_cos(start, end)(pos) == pytest.approx(
        start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2
    )
    assert sched_exp(start, end)(pos) == pytest.approx(start * (end / start) ** pos)
    assert sched_no(start, end)(pos) == start


def test_schedule_endpoints_and_midpoints():
    assert sched_lin(1.0, 3.0)(0.5) == pytest.approx(2.0)
    assert sched_cos(1.0, 3.0)(0.0) == pytest.approx(1.0)
    assert sched_cos(1.0, 3.0)(0.5) == pytest.approx(2.0)
    assert sched_cos(1.0, 3.0)(1.0) == pytest.approx(3.0)
    assert sched_exp(1e-7, 10.0)(0.5) == pytest.approx(math.sqrt(1e-7 * 10.0))
    assert sched_exp(1e-7, 10.0)(1.0) == pytest.approx(10.0)


def test_exp_rejects_non_positive_and_positions_outside_unit_interval():
    with pytest.raises(ValueError, match="start > 0"):
        sched_exp(0.0, 1.0)
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="position"):
            sched_lin(0.0, 1.0)(bad)
    # float round-off just outside [0, 1] is clamped, not an error mid-training
    assert sched_lin(0.0, 1.0)(1.0 + 1e-12) == 1.0
    assert sched_lin(0.0, 1.0)(-1e-12) == 0.0
    assert combine_scheds([0.5, 0.5], [sched_no(1), sched_no(2)])(1.0 + 1e-12) == 2.0


def test_combine_at_boundaries_and_at_one():
    sched = combine_scheds([0.3, 0.7], [sched_cos(0.3, 0.6), sched_cos(0.6, 0.2)])
    assert sched(0.0) == pytest.approx(0.3)
    assert sched(0.15) == pytest.approx(sched_cos(0.3, 0.6)(0.5))
    assert sched(0.3) == pytest.approx(0.6)  # exactly on the boundary: start of piece 2
    assert sched(0.3 + 0.35) == pytest.approx(sched_cos(0.6, 0.2)(0.5))
    assert sched(1.0) == pytest.approx(0.2)  # the course raised IndexError here


def test_combine_three_pieces_with_float_roundoff_and_empty_piece():
    # 0.1 + 0.2 + 0.7 != 1.0 exactly in floating point; it must still be accepted.
    sched = combine_scheds([0.1, 0.2, 0.7], [sched_lin(0, 1), sched_no(1), sched_lin(1, 0)])
    assert sched(0.05) == pytest.approx(0.5)
    assert sched(0.2) == pytest.approx(1.0)
    assert sched(0.65) == pytest.approx(0.5)
    assert sched(1.0) == pytest.approx(0.0)
    no_warmup = combine_scheds([0.0, 1.0], [sched_lin(5, 6), sched_lin(1, 0)])
    assert no_warmup(0.0) == pytest.approx(1.0)
    assert no_warmup(1.0) == pytest.approx(0.0)
    all_warmup = combine_scheds([1.0, 0.0], [sched_lin(0, 1), sched_lin(5, 6)])
    assert all_warmup(1.0) == pytest.approx(1.0)


def test_combine_validates_its_arguments():
    with pytest.raises(ValueError, match="sum to 1"):
        combine_scheds([0.3, 0.6], [sched_lin(0, 1), sched_lin(1, 0)])
    with pytest.raises(ValueError, match="one pct per schedule"):
        combine_scheds([1.0], [sched_lin(0, 1), sched_lin(1, 0)])
    with pytest.raises(ValueError, match=">= 0"):
        combine_scheds([1.5, -0.5], [sched_lin(0, 1), sched_lin(1, 0)])
    with pytest.raises(TypeError, match="non-callable"):
        combine_scheds([1.0], [0.5])


def test_one_cycle_values():
    scheds = one_cycle(1e-2, pct_start=0.25)
    lr, mom = scheds["lr"], scheds["mom"]
    assert set(scheds) == {"lr", "mom"}
    assert lr(0.0) == pytest.approx(1e-2 / 25)
    assert lr(0.25) == pytest.approx(1e-2)
    assert lr(0.125) == pytest.approx((1e-2 / 25 + 1e-2) / 2)  # cosine midpoint
    assert lr(1.0) == pytest.approx(1e-2 / 1e5)
    assert mom(0.0) == pytest.approx(0.95)
    assert mom(0.25) == pytest.approx(0.85)
    assert mom(1.0) == pytest.approx(0.95)
    # lr rises then falls monotonically; mom mirrors it
    positions = [i / 100 for i in range(101)]
    lrs = [lr(p) for p in positions]
    assert all(a <= b for a, b in zip(lrs[:25], lrs[1:26], strict=True))
    assert all(a >= b for a, b in zip(lrs[25:-1], lrs[26:], strict=True))
    assert "mom" not in one_cycle(1e-2, moms=None)
    with pytest.raises(ValueError, match="pct_start"):
        one_cycle(1e-2, pct_start=1.5)
    with pytest.raises(ValueError, match="lr_max"):
        one_cycle(0.0)


def test_schedules_pickle_round_trip():
    scheds = [
        sched_lin(0, 1),
        sched_cos(1, 0),
        sched_exp(1e-5, 1),
        sched_no(3),
        one_cycle(3e-3)["lr"],
    ]
    for sched in scheds:
        back = pickle.loads(pickle.dumps(sched))
        assert back == sched
        assert [back(p) for p in (0.0, 0.4, 1.0)] == [sched(p) for p in (0.0, 0.4, 1.0)]


def test_schedule_dict_round_trip_through_json_and_weights_only_torch_load():
    scheds = one_cycle(3e-3, pct_start=0.3)
    described = {name: schedule_to_dict(s) for name, s in scheds.items()}
    via_json = json.loads(json.dumps(described))
    buf = io.BytesIO()
    torch.save(described, buf)
    buf.seek(0)
    via_torch = torch.load(buf, weights_only=True)
    for data in (via_json, via_torch):
        for name, sched in scheds.items():
            back = schedule_from_dict(data[name])
            assert isinstance(back, CombinedSchedule)
            assert back == sched
    assert schedule_from_dict(schedule_to_dict(sched_no(2.0)))(0.7) == 2.0


def test_schedule_from_dict_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        schedule_from_dict({"kind": "zigzag", "start": 0, "end": 1})
    with pytest.raises(ValueError, match="malformed"):
        schedule_from_dict({"kind": "lin", "start": 0})
    with pytest.raises(TypeError, match="cannot describe"):
        schedule_to_dict(lambda p: p)
