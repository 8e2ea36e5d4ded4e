"""The callback contract: a fixed list of events, an `order`, and Cancel exceptions.

A callback is an object whose methods are named after events; the Learner calls each one
with itself as the only argument (`def after_loss(self, learn): ...`), in `order`. Methods
whose names look like events (`before_*`, `after_*`, `begin_*`) but are not in `EVENTS` are
refused when the callback is registered, so a typo (`after_los`) or a course-era name
(`begin_epoch`) fails loudly instead of never running. A callback changes the flow of
training only by raising one of the Cancel exceptions; returning a value is an error (the
course silently discarded return values, so "return True to skip the step" never worked).
"""

from __future__ import annotations

import difflib
import inspect

# One event per stage boundary of the loop, in the order the Learner fires them.
EVENTS = (
    "before_fit",
    "before_epoch",
    "before_train",
    "before_batch",
    "after_pred",
    "after_loss",
    "before_backward",
    "before_step",
    "after_step",
    "after_batch",
    "after_train",
    "before_validate",
    "after_validate",
    "after_epoch",
    "after_fit",
    # fired when the matching Cancel exception stopped that stage (before its after_* event)
    "after_cancel_batch",
    "after_cancel_step",
    "after_cancel_train",
    "after_cancel_validate",
    "after_cancel_epoch",
    "after_cancel_fit",
)
_EVENT_PREFIXES = ("before_", "after_", "begin_")


class CancelException(Exception):
    """Base of the exceptions a callback raises to stop part of the loop."""


class CancelBatch(CancelException):
    """Skip the rest of this batch (no backward/step); `after_batch` still runs."""


class CancelStep(CancelException):
    """Skip the optimizer step of this batch (e.g. fp16 gradients overflowed)."""


class CancelTrain(CancelException):
    """Stop this epoch's training pass; validation still runs."""


class CancelValidate(CancelException):
    """Stop this epoch's validation pass."""


class CancelEpoch(CancelException):
    """Stop this epoch; `after_epoch` runs and the next epoch starts."""


class CancelFit(CancelException):
    """Stop training; `after_fit` still runs."""


class CallbackError(TypeError):
    """A callback that breaks the contract: unknown event name, bad signature, return value."""


class Callback:
    """Base class: set `order` (lower runs first) and define methods named after `EVENTS`."""

    order: int = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order})"


def event_handlers(cb: object) -> dict[str, object]:
    """The bound event methods of `cb`, after checking every event-like name and signature."""
    handlers = {}
    for name in dir(type(cb)):
        if not name.startswith(_EVENT_PREFIXES):
            continue
        if name not in EVENTS:
            close = difflib.get_close_matches(name.replace("begin_", "before_"), EVENTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CallbackError(
                f"{type(cb).__name__}.{name} is not a Learner event{hint} "
                f"(names starting with before_/after_/begin_ are reserved for events: "
                f"{', '.join(EVENTS)})"
            )
        method = getattr(cb, name)
        if not callable(method):
            raise CallbackError(f"{type(cb).__name__}.{name} must be a method, not {method!r}")
        try:
            params = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):
            params = None
        if params is not None:
            required = [
                p for p in params
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
            if len(required) > 1 or (not required and not takes_varargs):
                raise CallbackError(
                    f"{type(cb).__name__}.{name} must take exactly one argument, the learner: "
                    f"def {name}(self, learn)"
                )
        handlers[name] = method
    return handlers


def returned_value_error(handler, result: object) -> CallbackError:
    """The error for a handler that returned something: signals are exceptions, not values."""
    return CallbackError(
        f"{handler.__qualname__} returned {result!r}; callbacks change the loop only by "
        "raising a Cancel exception (CancelBatch, CancelStep, ...), never by return values"
    )
