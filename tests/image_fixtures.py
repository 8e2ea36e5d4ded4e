"""Small uint8 test pictures for the kernel and transform tests."""

from __future__ import annotations

import numpy as np


def photo(height: int, width: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    """Noise on a gradient: every pixel differs, so any crop, flip or warp shows."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(height) * 3, np.arange(width) * 2)
    shape = (height, width) if channels is None else (height, width, channels)
    noise = rng.integers(0, 64, shape)
    grad = ramp if channels is None else ramp[:, :, None]
    return ((grad + noise) % 256).astype(np.uint8)


def readonly(image: np.ndarray) -> np.ndarray:
    """A read-only copy, like an array handed out by Ray's object store."""
    image = image.copy()
    image.flags.writeable = False
    return image
