"""Stop a run whose loss or weights stopped being finite, before it overwrites anything good."""

from __future__ import annotations

import math

import torch

from trainer.callbacks.core import Callback


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss (or a weight) became NaN or infinite."""


class NonFiniteGuard(Callback):
    """Raise `NonFiniteLossError` on the first NaN/inf loss, naming where it happened.

    It raises (rather than cancelling) so the run ends as a failure. Because it also checks
    the weights at the end of every epoch, before `CheckpointCallback` (higher order) saves
    them, the last checkpoint on disk is always the last good one.
    """

    order = 45

    def after_loss(self, learn) -> None:
        loss = learn.loss.detach()
        value = loss.item() if loss.numel() == 1 else loss.float().sum().item()
        if not math.isfinite(value):
            stage = "training" if learn.training else "validation"
            raise NonFiniteLossError(
                f"loss is {value} at epoch {learn.epoch}, batch {learn.iter} "
                f"({stage}); stopping the run. Checkpoints from earlier epochs are kept; "
                "try a lower learning rate (or --lr-find)"
            )

    def after_epoch(self, learn) -> None:
        with torch.no_grad():
            tensors = [*learn.model.named_parameters(), *learn.model.named_buffers()]
            bad = [name for name, t in tensors
                   if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteLossError(
                f"weights became NaN/inf during epoch {learn.epoch} (first: {bad[0]}, "
                f"{len(bad)} tensors); stopping without saving them. Checkpoints from earlier "
                "epochs are kept; try a lower learning rate"
            )
