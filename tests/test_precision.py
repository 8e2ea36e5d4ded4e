"""MixedPrecision: a no-op on the CPU by default; bf16 autocast; fp16 with a GradScaler whose
overflowed steps really skip (torch.amp.GradScaler('cpu') lets this run without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_training import (
    MEAN,
    STD,
    make_batches,
    one_torch_thread,  # noqa: F401 (fixture)
    sgd,
    state_equal,
    tiny_cnn,
)
from trainer.callbacks import AvgStatsCallback, Callback, MixedPrecision, NormalizeCallback
from trainer.learner import Learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def learner(amp, n_train=4, cbs=()):
    return Learner(tiny_cnn(), (make_batches(n_train, seed=1), make_batches(1, seed=2)),
                   F.cross_entropy, sgd, lr=0.1,
                   cbs=[NormalizeCallback(MEAN, STD), AvgStatsCallback(), *cbs,
                        *([amp] if amp else [])])


class AutocastProbe(Callback):
    order = 11  # just after MixedPrecision

    def __init__(self):
        self.seen = []

    def after_pred(self, learn):
        self.seen.append(("pred", torch.is_autocast_enabled("cpu"), learn.pred.dtype))

    def before_backward(self, learn):
        self.seen.append(("backward", torch.is_autocast_enabled("cpu"), learn.loss.dtype))


def test_on_the_cpu_it_does_nothing_unless_asked():
    plain = learner(None)
    plain.fit(2)
    probe = AutocastProbe()
    amp = MixedPrecision(torch.float16)
    with_amp = learner(amp, cbs=[probe])
    with_amp.fit(2)
    assert not amp.active and amp.scaler is None
    assert state_equal(plain.model.state_dict(), with_amp.model.state_dict())
    assert {s[1:] for s in probe.seen} == {(False, torch.float32)}


def test_bf16_autocast_covers_forward_and_loss_only():
    probe = AutocastProbe()
    amp = MixedPrecision(torch.bfloat16, cpu=True)
    learn = learner(amp, cbs=[probe])
    learn.fit(2)
    assert amp.active and amp.scaler is None
    assert ("pred", True, torch.bfloat16) in probe.seen
    assert all(not enabled for stage, enabled, _ in probe.seen if stage == "backward")
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of fit
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert learn.history[-1]["valid_loss"] < learn.history[0]["train_loss"]


def test_fp16_overflowed_steps_are_really_skipped():
    init_scale = 2.0**30  # far too large: the first fp16 backward passes overflow

    class StepWatch(Callback):
        order = 90

        def __init__(self):
            self.batches = []  # (skipped, params before, params after, max |grad| at step)

        def before_batch(self, learn):
            self.before = [p.detach().clone() for p in learn.model.parameters()]
            self.skipped, self.grad_max = False, None

        def after_cancel_step(self, learn):
            self.skipped = True

        def after_step(self, learn):
            self.grad_max = max(p.grad.abs().max().item() for p in learn.model.parameters())

        def after_batch(self, learn):
            if not learn.training:
                return
            after = [p.detach().clone() for p in learn.model.parameters()]
            self.batches.append((self.skipped, self.before, after, self.grad_max,
                                 len(learn.opt.state)))

    watch = StepWatch()
    amp = MixedPrecision(torch.float16, cpu=True, init_scale=init_scale)
    learn = learner(amp, n_train=10, cbs=[watch])
    learn.fit(2)

    skipped = [b for b in watch.batches if b[0]]
    stepped = [b for b in watch.batches if not b[0]]
    assert 1 <= len(skipped) == amp.skipped_steps and stepped
    assert watch.batches[0][0] and watch.batches[0][4] == 0  # no momentum state was created
    for _, before, after, _, _ in skipped:
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for _, before, after, grad_max, _ in stepped:
        assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert grad_max < 100  # the optimizer saw unscaled gradients
    assert amp.scaler.get_scale() == init_scale * 0.5 ** len(skipped)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_dtype_is_checked():
    with pytest.raises(ValueError, match="bfloat16"):
        MixedPrecision(torch.float32)


def test_fp16_resume_continues_with_the_learned_loss_scale():
    """The GradScaler's scale is part of the checkpoint: 1 epoch + resume + 1 epoch ends
    with the same weights and scale as 2 epochs straight (the scale had backed off from an
    init_scale that overflowed; starting again from init_scale would skip other steps)."""
    from trainer.callbacks import restore
    from trainer.callbacks.checkpoint import checkpoint_state

    def run():
        return MixedPrecision(torch.float16, cpu=True, init_scale=2.0**30)

    torch.manual_seed(0)
    straight_amp = run()
    straight = learner(straight_amp)
    straight.fit(2)

    torch.manual_seed(0)
    first_amp = run()
    first = learner(first_amp)
    first.fit(1)
    state = checkpoint_state(first)
    assert 0 < state["callbacks"]["MixedPrecision"]["scaler"]["scale"] < 2.0**30
    torch.manual_seed(123)  # a fresh process: nothing carried over but the checkpoint
    second_amp = run()
    second = learner(second_amp)
    second.fit(2, start_epoch=restore(second, state))
    assert second_amp.scaler.get_scale() == straight_amp.scaler.get_scale()
    assert second_amp.skipped_steps == straight_amp.skipped_steps > 0
    assert state_equal(second.model.state_dict(), straight.model.state_dict())
