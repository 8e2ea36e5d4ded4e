"""Put the model and each batch on the training device, then turn uint8 images into floats there.

Batches arrive from the stream as uint8 on the CPU (4x fewer bytes to copy than float32);
conversion and normalisation happen on the device, in one fused pass over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.callbacks.core import Callback


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class DeviceCallback(Callback):
    """Move the model (before fit) and every batch (before each batch) to `device`.

    `channels_last` stores images and conv weights as NHWC, which the conv kernels run
    faster on (CPU and CUDA tensor cores). On CUDA the batch is pinned and copied without
    blocking, so the copy overlaps the previous step's queued kernels.
    """

    order = -30

    def __init__(self, device: str | torch.device | None = None, channels_last: bool = True):
        self.device = torch.device(device) if device is not None else default_device()
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.non_blocking = self.device.type == "cuda"

    def before_fit(self, learn) -> None:
        moved = model_device(learn.model) != self.device
        learn.model.to(self.device, memory_format=self.memory_format)
        if moved and learn.opt is not None and len(getattr(learn.opt, "state", ())):
            # Optimizer state loaded before the move (a resumed run) must follow the
            # parameters; load_state_dict places each state tensor beside its parameter.
            learn.opt.load_state_dict(learn.opt.state_dict())

    def before_batch(self, learn) -> None:
        xb, yb = learn.xb, learn.yb
        if self.non_blocking and not xb.is_pinned():
            xb, yb = xb.pin_memory(), yb.pin_memory()
        if xb.dim() == 4:
            learn.xb = xb.to(self.device, non_blocking=self.non_blocking,
                             memory_format=self.memory_format)
        else:
            learn.xb = xb.to(self.device, non_blocking=self.non_blocking)
        learn.yb = yb.to(self.device, non_blocking=self.non_blocking)


class Normalize:
    """uint8 images -> float32 `(x / 255 - mean) / std` per channel, on the images' device.

    The one normalisation of tench: the Learner's `NormalizeCallback`, LSUV's first batch
    and `tench predict` all call it. `mean` and `std` are on the 0-1 scale, one value per
    channel, as `meta.json`'s `stats` gives them (see `from_stats`).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        if any(not s > 0 for s in std):
            raise ValueError(f"std must be > 0 for every channel, got {std}")
        # Folded into one subtract and one divide on the 0-255 scale.
        self.shift = torch.tensor([m * 255.0 for m in mean]).view(1, -1, 1, 1)
        self.scale = torch.tensor([s * 255.0 for s in std]).view(1, -1, 1, 1)

    @classmethod
    def from_stats(cls, stats: dict) -> Normalize:
        """From `meta.json`'s `{"mean": [r, g, b], "std": [r, g, b]}`."""
        return cls(stats["mean"], stats["std"])

    def to(self, device: str | torch.device) -> Normalize:
        """Keep the constants on `device` (done once, not per batch)."""
        self.shift, self.scale = self.shift.to(device), self.scale.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> float32 of the same shape and memory format."""
        if images.dtype != torch.uint8:
            raise TypeError(f"normalisation expects uint8 image batches, got {images.dtype}")
        if images.shape[1] != self.shift.shape[1]:
            raise ValueError(
                f"batch has {images.shape[1]} channels but mean/std have {self.shift.shape[1]}"
            )
        if self.shift.device != images.device:
            self.to(images.device)
        # .float() keeps the memory format (channels_last stays channels_last).
        return images.float().sub_(self.shift).div_(self.scale)


class NormalizeCallback(Callback):
    """Normalise every batch on its device with `Normalize` (after DeviceCallback)."""

    order = -20

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.normalize = Normalize(mean, std)

    @classmethod
    def from_stats(cls, stats: dict) -> NormalizeCallback:
        """From `meta.json`'s `{"mean": [r, g, b], "std": [r, g, b]}`."""
        return cls(stats["mean"], stats["std"])

    @property
    def shift(self) -> torch.Tensor:  # mean * 255, (1, C, 1, 1)
        return self.normalize.shift

    @property
    def scale(self) -> torch.Tensor:  # std * 255, (1, C, 1, 1)
        return self.normalize.scale

    def before_fit(self, learn) -> None:
        self.normalize.to(model_device(learn.model))

    def before_batch(self, learn) -> None:
        learn.xb = self.normalize(learn.xb)
