"""MixUp on the device: train on blends of two images, with the loss blended the same way.

lam ~ Beta(alpha, alpha) per sample, lam = max(lam, 1 - lam); x = lam x + (1 - lam) x[perm];
loss = lam L(pred, y) + (1 - lam) L(pred, y[perm]) (the arithmetic is `trainer.losses`).
Validation sees plain images and the plain loss. The random draws come from a numpy
Generator seeded by (seed, epoch), so a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from trainer.callbacks.core import Callback
from trainer.losses import mix_loss, mixup_batch


class MixUp(Callback):
    """Mix training batches after normalisation (floats on the device) and mix their loss.

    The loss is replaced in `after_loss`, before the stats, recorder and guard read it;
    the learner's `loss_func` itself is never swapped, so an exception cannot leave a
    learner stuck with a mixing loss.
    """

    order = -10  # after NormalizeCallback (-20), before MixedPrecision's autocast (10)

    def __init__(self, alpha: float = 0.4, seed: int = 0):
        if not alpha > 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.alpha, self.seed = alpha, seed
        self.rng: np.random.Generator | None = None
        self.y_perm = self.lam = None

    def before_train(self, learn) -> None:
        self.rng = np.random.default_rng((self.seed, learn.epoch))

    def before_batch(self, learn) -> None:
        if learn.training:
            learn.xb, _, self.y_perm, self.lam = mixup_batch(learn.xb, learn.yb, self.alpha,
                                                             self.rng)

    def after_loss(self, learn) -> None:
        if learn.training:
            learn.loss = mix_loss(learn.loss_func, learn.pred, learn.yb, self.y_perm, self.lam)
