"""MixUp on the device: train on blends of two images, with the loss blended the same way.

lam ~ Beta(alpha, alpha) per sample, lam = max(lam, 1 - lam); x = lam x + (1 - lam) x[perm];
loss = lam L(pred, y) + (1 - lam) L(pred, y[perm]) (the arithmetic is `trainer.losses`).
Validation sees plain images and the plain loss. The random draws come from a numpy
Generator seeded by (seed, epoch), so a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import json

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
        self.epoch, self._resume = 0, None

    def state_dict(self) -> dict:
        """Where this epoch's draws stand (the generator's state, as JSON-able text), so a
        run resumed mid-epoch mixes its remaining batches as an uninterrupted one would."""
        rng = None if self.rng is None else json.dumps(self.rng.bit_generator.state)
        return {"epoch": self.epoch, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def before_train(self, learn) -> None:
        self.rng, self.epoch = np.random.default_rng((self.seed, learn.epoch)), learn.epoch
        saved, self._resume = self._resume, None
        if saved is not None and saved["rng"] is not None and saved["epoch"] == learn.epoch \
                and learn.mid_epoch_resume:
            self.rng.bit_generator.state = json.loads(saved["rng"])

    def before_batch(self, learn) -> None:
        if learn.training:
            learn.xb, _, self.y_perm, self.lam = mixup_batch(learn.xb, learn.yb, self.alpha,
                                                             self.rng)

    def after_loss(self, learn) -> None:
        if learn.training:
            learn.loss = mix_loss(learn.loss_func, learn.pred, learn.yb, self.y_perm, self.lam)
