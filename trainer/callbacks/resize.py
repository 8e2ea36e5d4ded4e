"""Progressive resizing: train the early epochs on smaller images, the last ones at full size.

Small images make the early epochs cheap (the pixels per image fall with the square of the
side) while the model is still learning coarse features; the last epochs at the final size
let it settle at the size it is validated and used at (fastai's and FFCV's recipe). The
stream changes its chain between epochs on the same Ray actors (`ShardStream.set_size`).
"""

from __future__ import annotations

from trainer.callbacks.core import Callback

SIZE_STEP = 8  # sides in the ramp are multiples of this (FFCV rounds to 32 at ImageNet sizes)


def size_for_epoch(epoch: int, epochs: int, start: int | None, final: int,
                   step: int = SIZE_STEP) -> int:
    """The training side of `epoch` out of `epochs`, ramping from `start` to `final`.

    The first half of the epochs (`epochs // 2`) ramps linearly from `start` towards `final`,
    rounded down to a multiple of `step` (never below `start`); the rest train at `final`.
    A pure function of the epoch, so a resumed run trains each epoch at the size the
    uninterrupted run would. `start=None`: every epoch at `final`.
    """
    ramp = epochs // 2
    if start is None or epoch >= ramp:
        return final
    side = start + (final - start) * epoch / ramp
    return max(start, int(side) // step * step)


def parse_size(text: str | int) -> tuple[int | None, int]:
    """`tench fit --size` as (size_start, size): "64" -> (None, 64), "48:64" -> (48, 64)."""
    start, sep, final = str(text).partition(":")
    try:
        return (int(start), int(final)) if sep else (None, int(start))
    except ValueError:
        raise ValueError(f"--size must be N or START:N (e.g. 64 or 48:64), got {text!r}") from None


class ProgressiveResize(Callback):
    """Before each epoch, set the training stream's image side to `size_for_epoch`.

    Validation keeps its own stream at the final size. The stream needs `set_size`
    (`ShardStream` has it; the change takes effect at its next iteration).
    """

    order = -40  # before anything that looks at the epoch's first batch

    def __init__(self, start: int | None, final: int):
        self.start, self.final = start, final

    def size(self, epoch: int, epochs: int) -> int:
        return size_for_epoch(epoch, epochs, self.start, self.final)

    def before_fit(self, learn) -> None:
        if not callable(getattr(learn.data.train, "set_size", None)):
            raise TypeError(f"progressive resizing needs a training stream with set_size(), "
                            f"got {type(learn.data.train).__name__}")

    def before_epoch(self, learn) -> None:
        side = self.size(learn.epoch, learn.n_epochs)
        if getattr(learn.data.train, "size", None) != side:
            learn.data.train.set_size(side)
