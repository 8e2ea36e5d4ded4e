"""Fine-tuning's two phases: the first epochs train the head only, the rest everything."""

from __future__ import annotations

from trainer.callbacks.core import Callback
from trainer.models import freeze_body


class FreezeBody(Callback):
    """Before every epoch: frozen body (head and BatchNorm train) while `epoch < freeze_epochs`,
    everything trainable after.

    The phase is a function of the epoch index alone, so a run resumed from any epoch's
    last.pt is in the same phase as the uninterrupted run. Frozen parameters get no gradient,
    so the optimizer neither moves nor decays them and starts their state when they unfreeze.
    """

    order = 5  # before the epoch's first batch, whatever else runs before_epoch

    def __init__(self, freeze_epochs: int):
        if freeze_epochs < 0:
            raise ValueError(f"FreezeBody needs freeze_epochs >= 0, got {freeze_epochs}")
        self.freeze_epochs = freeze_epochs

    def before_epoch(self, learn) -> None:
        freeze_body(learn.model, frozen=learn.epoch < self.freeze_epochs)
