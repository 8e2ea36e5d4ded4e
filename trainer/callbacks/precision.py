"""Mixed precision with torch.amp: bf16 autocast, or fp16 autocast with a GradScaler.

With fp16 the loss is scaled before backward so small gradients survive; when the scaled
gradients overflow, the step is skipped by raising `CancelStep` (the course returned True
from `after_backward`, a value its Learner threw away, so overflowed steps were applied).
"""

from __future__ import annotations

import torch

from trainer.callbacks.core import Callback, CancelStep
from trainer.callbacks.device import model_device


class _StepProbe:
    """Stands in for the optimizer inside `GradScaler.step`: it unscales the real param
    groups' gradients and calls `step()` here only if they are all finite, which tells
    us whether to let the Learner step the real optimizer."""

    def __init__(self) -> None:
        self.param_groups: list = []
        self.stepped = False

    def step(self) -> None:
        self.stepped = True


class MixedPrecision(Callback):
    """Autocast the forward pass and loss; with fp16, scale the loss and skip bad steps.

    Active only when the model is on CUDA (after DeviceCallback), unless `cpu=True`, which
    also runs it on the CPU (CPU autocast is mostly useful for tests: it is rarely faster).
    Elsewhere it does nothing at all.
    """

    order = 10

    def __init__(self, dtype: torch.dtype = torch.bfloat16, cpu: bool = False,
                 init_scale: float = 2.0**16, growth_interval: int = 2000):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"MixedPrecision dtype must be torch.bfloat16 or float16, got {dtype}")
        self.dtype, self.cpu = dtype, cpu
        self.init_scale, self.growth_interval = init_scale, growth_interval
        self.active = False
        self.autocast: torch.autocast | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self._probe = _StepProbe()
        self._in_autocast = False
        self._update_pending = False
        self.skipped_steps = 0
        self._resume: dict | None = None  # scaler state from a checkpoint, applied at fit

    def state_dict(self) -> dict:
        """The fp16 loss scale and its growth counter (empty without a scaler): a resumed
        run starts from the scale it had learned, not from `init_scale` again."""
        scaler = self.scaler.state_dict() if self.scaler is not None else {}
        return {"scaler": scaler, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def before_fit(self, learn) -> None:
        device_type = model_device(learn.model).type
        self.active = device_type == "cuda" or (self.cpu and device_type == "cpu")
        if not self.active:
            return
        self.autocast = torch.autocast(device_type, dtype=self.dtype)
        self.scaler = None
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(device_type, init_scale=self.init_scale,
                                               growth_interval=self.growth_interval)
        self.skipped_steps = 0
        if self._resume is not None:
            if self.scaler is not None and self._resume.get("scaler"):
                self.scaler.load_state_dict(self._resume["scaler"])
            self.skipped_steps = int(self._resume.get("skipped_steps", 0))
            self._resume = None

    def before_batch(self, learn) -> None:
        if self.active:
            self.autocast.__enter__()
            self._in_autocast = True

    def after_loss(self, learn) -> None:
        self._leave_autocast()  # backward and the step run outside autocast, as torch advises

    def _leave_autocast(self) -> None:
        if self._in_autocast:
            self._in_autocast = False
            self.autocast.__exit__(None, None, None)

    def before_backward(self, learn) -> None:
        if self.scaler is not None:
            learn.loss_grad = self.scaler.scale(learn.loss_grad)

    def before_step(self, learn) -> None:
        if self.scaler is None:
            return
        self._probe.param_groups = learn.opt.param_groups
        self._probe.stepped = False
        self.scaler.step(self._probe)  # unscales the real gradients in place
        self._update_pending = True
        if not self._probe.stepped:
            self.skipped_steps += 1
            raise CancelStep

    def after_batch(self, learn) -> None:
        self._leave_autocast()  # a batch cancelled before its loss
        if self._update_pending:  # after a step, a skipped step or a cancelled one alike
            self._update_pending = False
            self.scaler.update()  # lowers the scale after an overflow, grows it when stable

    def after_fit(self, learn) -> None:
        self._leave_autocast()
