"""The Learner loop: event order, the callback contract, Cancel exceptions, real training."""

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
from trainer.callbacks import (
    EVENTS,
    AvgStatsCallback,
    Callback,
    CallbackError,
    CancelBatch,
    CancelEpoch,
    CancelFit,
    CancelStep,
    CancelTrain,
    CancelValidate,
    DeviceCallback,
    NormalizeCallback,
)
from trainer.learner import DataPair, Learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class EventLog(Callback):
    """Records every event it sees, in order."""

    def __init__(self, order: int = 0):
        self.order = order
        self.events: list[str] = []


for _event in EVENTS:
    setattr(EventLog, _event, lambda self, learn, _e=_event: self.events.append(_e))


def make_learner(n_train=2, n_valid=1, cbs=(), lr=0.1, **kw):
    data = DataPair(make_batches(n_train, seed=1), make_batches(n_valid, seed=2))
    cbs = [NormalizeCallback(MEAN, STD), *cbs]
    return Learner(tiny_cnn(), data, F.cross_entropy, sgd, lr=lr, cbs=cbs, **kw)


TRAIN_BATCH = ["before_batch", "after_pred", "after_loss", "before_backward", "before_step",
               "after_step", "after_batch"]
VALID_BATCH = ["before_batch", "after_pred", "after_loss", "after_batch"]


def epoch_events(n_train, n_valid):
    return (["before_epoch", "before_train"] + TRAIN_BATCH * n_train + ["after_train"]
            + ["before_validate"] + VALID_BATCH * n_valid + ["after_validate", "after_epoch"])


def test_events_fire_in_order_and_before_epoch_once_per_epoch():
    log = EventLog()
    learn = make_learner(n_train=2, n_valid=1, cbs=[log])
    learn.fit(2)
    assert log.events == ["before_fit"] + epoch_events(2, 1) * 2 + ["after_fit"]
    assert log.events.count("before_epoch") == 2  # the course fired it twice per epoch


@pytest.mark.parametrize("name, hint", [("begin_epoch", "before_epoch"),
                                        ("after_los", "after_loss"),
                                        ("after_backward", None)])
def test_event_like_names_not_in_the_list_are_refused_at_registration(name, hint):
    bad = type("Bad", (Callback,), {name: lambda self, learn: None})()
    with pytest.raises(CallbackError, match=name) as info:
        make_learner(cbs=[bad])
    if hint:
        assert hint in str(info.value)
    learn = make_learner()
    with pytest.raises(CallbackError):
        learn.fit(1, cbs=[bad])
    assert bad not in learn.cbs


def test_event_methods_must_take_the_learner():
    class CourseStyle(Callback):
        def after_loss(self):  # the course's signature: state came through __getattr__
            pass

    with pytest.raises(CallbackError, match="learn"):
        make_learner(cbs=[CourseStyle()])


def test_a_callback_returning_a_value_is_an_error():
    class SkipStep(Callback):
        def before_step(self, learn):
            return True  # the course's dead "return True to skip" protocol

    learn = make_learner(cbs=[SkipStep()])
    with pytest.raises(CallbackError, match="returned True"):
        learn.fit(1)


def test_callbacks_run_sorted_by_order_stably():
    calls = []

    def named(label, order):
        cb = type(f"Cb{label}", (Callback,),
                  {"before_fit": lambda self, learn: calls.append(label)})()
        cb.order = order
        return cb

    learn = make_learner(cbs=[named("c", 10), named("a", -5), named("b1", 0), named("b2", 0)])
    learn.fit(1, cbs=[named("z", 99), named("y", -99)])
    assert calls == ["y", "a", "b1", "b2", "c", "z"]


def raising(event, exc, when=lambda learn: True):
    """A callback that raises `exc` at `event` (after EventLog has recorded that event)."""

    def handler(self, learn):
        if when(learn):
            raise exc

    return type("Raiser", (Callback,), {event: handler, "order": 100})()


def test_cancel_batch_skips_backward_and_step_but_not_after_batch():
    log = EventLog()
    learn = make_learner(n_train=1, n_valid=0, cbs=[log, raising("after_pred", CancelBatch)])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1)
    train = log.events[log.events.index("before_train") + 1: log.events.index("after_train")]
    assert train == ["before_batch", "after_pred", "after_cancel_batch", "after_batch"]
    params_after = dict(learn.model.named_parameters())
    assert all(torch.equal(before[k], params_after[k]) for k in params_after)


def test_cancel_step_really_skips_the_optimizer_step():
    log = EventLog()
    learn = make_learner(n_train=2, n_valid=0, cbs=[log, raising("before_step", CancelStep)])
    params_before = [p.clone() for p in learn.model.parameters()]
    learn.fit(1)
    assert "after_step" not in log.events
    assert log.events.count("after_cancel_step") == 2
    assert all(torch.equal(a, b) for a, b in zip(params_before, learn.model.parameters(),
                                                 strict=True))
    assert len(learn.opt.state) == 0  # momentum buffers never created


def test_cancel_train_still_validates():
    log = EventLog()
    learn = make_learner(n_train=3, n_valid=2, cbs=[log, raising("after_batch", CancelTrain,
                                                                 lambda learn: learn.training)])
    learn.fit(1)
    assert log.events.count("before_backward") == 1
    assert "after_cancel_train" in log.events and "after_train" in log.events
    assert log.events.count("after_loss") == 1 + 2  # one training batch, both valid batches


def test_cancel_validate_skips_validation_batches_only():
    log = EventLog()
    learn = make_learner(n_train=2, n_valid=2, cbs=[log, raising("before_validate",
                                                                 CancelValidate)])
    learn.fit(2)
    assert log.events.count("after_pred") == 4  # training batches only
    assert log.events.count("after_cancel_validate") == 2
    assert log.events.count("after_validate") == 2 and log.events.count("after_epoch") == 2


def test_cancel_epoch_moves_on_to_the_next_epoch():
    log = EventLog()
    learn = make_learner(n_train=2, n_valid=1, cbs=[log, raising(
        "before_train", CancelEpoch, lambda learn: learn.epoch == 0)])
    learn.fit(2)
    first = log.events[: log.events.index("after_epoch") + 1]
    assert first == ["before_fit", "before_epoch", "before_train", "after_cancel_epoch",
                     "after_epoch"]
    assert log.events[len(first):] == epoch_events(2, 1) + ["after_fit"]


def test_cancel_fit_stops_training_and_still_runs_after_fit():
    log = EventLog()
    learn = make_learner(n_train=3, n_valid=1, cbs=[log, raising(
        "after_batch", CancelFit, lambda learn: learn.training and learn.iter == 1)])
    learn.fit(5)
    assert log.events.count("before_backward") == 2
    assert log.events[-2:] == ["after_cancel_fit", "after_fit"]
    assert "after_epoch" not in log.events


def test_other_exceptions_propagate_and_fit_callbacks_are_removed():
    log = EventLog()
    learn = make_learner()
    with pytest.raises(ZeroDivisionError):
        learn.fit(1, cbs=[log, raising("after_loss", ZeroDivisionError)])
    assert log not in learn.cbs and "after_fit" not in log.events
    learn.fit(1)  # the learner still works, without the temporary callbacks


def test_validation_runs_in_eval_mode_without_gradients():
    seen = []

    class Probe(Callback):
        def after_pred(self, learn):
            seen.append((learn.training, learn.model.training, torch.is_grad_enabled(),
                         learn.pred.requires_grad))

    make_learner(n_train=1, n_valid=1, cbs=[Probe()]).fit(1)
    assert seen == [(True, True, True, True), (False, False, False, False)]


def test_pct_train_covers_the_whole_fit_and_resumes_in_place():
    seen = []

    class Probe(Callback):
        def before_batch(self, learn):
            if learn.training:
                seen.append(learn.pct_train)

    learn = make_learner(n_train=4, n_valid=1, cbs=[Probe()])
    learn.fit(2)
    assert seen == pytest.approx([(e + i / 4) / 2 for e in range(2) for i in range(4)])
    assert learn.pct_train == 1.0
    seen.clear()
    learn.fit(4, start_epoch=3)  # a resumed run sees the position of an uninterrupted one
    assert seen == pytest.approx([(3 + i / 4) / 4 for i in range(4)])


def test_optimizer_is_created_lazily_from_the_splitter_groups_and_kept():
    made = []

    def opt_func(groups, lr):
        made.append(lr)
        return torch.optim.SGD(groups, lr=lr)

    def splitter(model):
        return [{"params": list(model[:2].parameters())},
                {"params": list(model[2:].parameters())}]

    learn = Learner(tiny_cnn(), (make_batches(1), None), F.cross_entropy, opt_func, lr=0.03,
                    cbs=[NormalizeCallback(MEAN, STD)], splitter=splitter)
    assert learn.opt is None
    learn.fit(1)
    learn.fit(1)
    assert made == [0.03] and len(learn.opt.param_groups) == 2


def test_streams_without_len_and_with_set_epoch():
    class Stream:
        def __init__(self, batches):
            self.batches, self.epochs = batches, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(self.batches)

    train = Stream(make_batches(3))
    learn = Learner(tiny_cnn(), (train, None), F.cross_entropy, sgd,
                    cbs=[NormalizeCallback(MEAN, STD)])
    n_iters = []
    learn.fit(3, cbs=[type("P", (Callback,), {
        "after_batch": lambda self, learn: n_iters.append(learn.n_iter)})()])
    assert train.epochs == [0, 1, 2]
    assert n_iters == [None] * 9


def test_training_really_learns_the_easy_task():
    data = DataPair(make_batches(12, seed=1), make_batches(4, seed=2))
    learn = Learner(tiny_cnn(), data, F.cross_entropy, sgd, lr=0.1,
                    cbs=[DeviceCallback("cpu"), NormalizeCallback(MEAN, STD), AvgStatsCallback()])
    learn.fit(6)
    first, last = learn.history[0], learn.history[-1]
    assert [row["epoch"] for row in learn.history] == list(range(6))
    assert last["valid_loss"] < 0.5 * first["valid_loss"]
    assert last["accuracy"] >= 0.9
    assert last["train_loss"] < first["train_loss"]


def test_fit_arguments_are_checked():
    learn = make_learner()
    with pytest.raises(ValueError, match="start_epoch"):
        learn.fit(2, start_epoch=3)
    with pytest.raises(ValueError):
        learn.fit(0)


def test_a_callback_cannot_be_registered_twice():
    log = EventLog()
    learn = make_learner(cbs=[log])
    with pytest.raises(CallbackError, match="already"):
        learn.fit(1, cbs=[log])
    assert learn.cbs.count(log) == 1


def test_weights_change_identically_to_a_bare_loop():
    """The Learner adds no arithmetic of its own: same batches, same optimizer, same weights."""
    batches = make_batches(3, seed=5)
    learn = make_learner(cbs=[])
    learn.data = DataPair(batches, None)
    bare = tiny_cnn()
    assert state_equal(bare.state_dict(), learn.model.state_dict())
    learn.fit(2)
    opt = sgd(bare.parameters(), lr=0.1)
    norm = NormalizeCallback(MEAN, STD)
    for _ in range(2):
        bare.train()
        for b in batches:
            xb = b.images.float().sub_(norm.shift).div_(norm.scale)
            loss = F.cross_entropy(bare(xb), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert state_equal(bare.state_dict(), learn.model.state_dict())
