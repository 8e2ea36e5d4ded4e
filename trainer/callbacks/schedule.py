"""Set any optimizer hyper-parameter from a schedule of the training position, every batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from trainer.callbacks.core import Callback

ScheduleFn = Callable[[float], float]


class ParamScheduler(Callback):
    """`{hyper name: schedule or one schedule per param group}`, e.g. `one_cycle(1e-2)`.

    Before each training batch, every param group's `name` is set to `f(learn.pct_train)`.
    The name is written as given ('lr', 'mom', or torch.optim's 'momentum'); a name the
    optimizer's groups do not have is an error at the start of fit, since writing it would
    silently do nothing. Because the position is `learn.pct_train`, a resumed fit
    (`start_epoch > 0`) continues the schedule where the interrupted one stopped.
    """

    order = 20

    def __init__(self, scheds: Mapping[str, ScheduleFn | Sequence[ScheduleFn]]):
        if not scheds:
            raise ValueError("ParamScheduler needs at least one {hyper name: schedule}")
        self.scheds = dict(scheds)
        self._per_group: list[tuple[str, list[ScheduleFn]]] = []

    def before_fit(self, learn) -> None:
        groups = learn.opt.param_groups
        self._per_group = []
        for name, sched in self.scheds.items():
            for i, group in enumerate(groups):
                if name not in group:
                    known = sorted(k for k in group if k != "params")
                    raise ValueError(
                        f"ParamScheduler: param group {i} of {type(learn.opt).__name__} has no "
                        f"hyper-parameter {name!r} (it has {known})"
                    )
            funcs = list(sched) if isinstance(sched, Sequence) else [sched] * len(groups)
            if len(funcs) != len(groups):
                raise ValueError(
                    f"ParamScheduler: {len(funcs)} schedules for {name!r} but the optimizer has "
                    f"{len(groups)} param groups; give one schedule, or one per group"
                )
            self._per_group.append((name, funcs))

    def before_batch(self, learn) -> None:
        if not learn.training:
            return
        pos = learn.pct_train
        for name, funcs in self._per_group:
            for group, func in zip(learn.opt.param_groups, funcs, strict=True):
                group[name] = func(pos)
