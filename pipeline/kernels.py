"""uint8 image kernels: pure functions on HxW or HxWxC arrays, never writing into their input.

The transforms in `pipeline.transforms` are thin, randomised wrappers around these (and the
decoder uses `to_rgb`). Every function returns a C-contiguous array and none writes into its
input, so an input from Ray's object store (read-only) is fine; where there is nothing to
change (an RGB image to `to_rgb`, a resize to the same size) the input itself comes back.

Resampling: torch's uint8 bilinear `F.interpolate(antialias=True)` (a port of PIL's convolution
resampler, same output within 2 levels) on a channels-last tensor takes 50 us per 160 px ->
128 px crop, against ~210 us for PIL `Image.resize(BILINEAR, box=...)`, so resizes and crops
use torch; so does the flip. The perspective warp uses PIL's `Image.transform`, which torch
has no uint8 equivalent for. The timings here and below: `bench/kernel_bench.py`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any uint8 grey, grey+alpha, RGB or RGBA image as HxWx3 RGB.

    Alpha is composited on white: the visible pixels keep their colour and the transparent
    background becomes a uniform white instead of whatever hidden colour the encoder left there.
    """
    check_image(image)
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 3:
        return np.ascontiguousarray(image)
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels in (2, 4):
        colour = image[:, :, :-1].astype(np.uint16)
        alpha = image[:, :, -1:].astype(np.uint16)
        # colour*a + white*(1-a), rounded, in integers
        mixed = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        return np.repeat(mixed, 3, axis=2) if channels == 2 else mixed
    raise ValueError(f"to_rgb: expected 1 to 4 channels, got image of shape {image.shape}")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of an HWC uint8 image to exactly (height, width).

    The input goes to torch as a contiguous channels-last (1, C, H, W) tensor: its uint8
    kernel has a vectorised path for that layout and answers in the same layout, which is
    the HWC array wanted back. A strided crop view, or a result in NCHW order needing a
    transposing copy back to HWC, measured 2.5x slower (127 vs 50 us, 130 px -> 128 px).
    """
    check_image(image)
    if image.shape[:2] == (height, width):
        return np.ascontiguousarray(image)
    hwc = image[:, :, None] if image.ndim == 2 else image
    nchw = _as_tensor(hwc).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(
        nchw, size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    out = out.contiguous(memory_format=torch.channels_last)[0].permute(1, 2, 0).numpy()
    return out[:, :, 0] if image.ndim == 2 else out  # (H, W, C) or (H, W), contiguous


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) scaled so the shorter side is `size`, keeping the aspect ratio."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def center_crop_box(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """(top, left) of a crop_h x crop_w box centred in a height x width image."""
    return (height - crop_h) // 2, (width - crop_w) // 2


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w): an area fraction ~U(scale) with a log-uniform aspect ratio.

    Fixes the course's version: the image area is fixed outside the retry loop (the course
    shrank it every attempt), and the fallback is the centred crop of the largest region whose
    aspect ratio lies within `ratio` (the course used an undefined crop size), like torchvision.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    # fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_w, crop_h = width, min(height, max(1, round(width / ratio[0])))
    elif image_ratio > ratio[1]:
        crop_w, crop_h = min(width, max(1, round(height * ratio[1]))), height
    else:
        crop_w, crop_h = width, height
    top, left = center_crop_box(height, width, crop_h, crop_w)
    return top, left, crop_h, crop_w


def perspective_coeffs(
    output_corners: Sequence[tuple[float, float]], source_corners: Sequence[tuple[float, float]]
) -> np.ndarray:
    """The 8 coefficients (a..h) of the projective map sending each output corner to its source.

    PIL's `Image.Transform.PERSPECTIVE` samples output pixel (x, y) at
    ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1)); writing that out for
    four point pairs gives 8 linear equations in the 8 unknowns.
    """
    rows, rhs = [], []
    for (x, y), (u, v) in zip(output_corners, source_corners, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))


def warp_perspective(
    image: np.ndarray, source_corners: Sequence[tuple[float, float]]
) -> np.ndarray:
    """Map the quadrilateral `source_corners` (TL, TR, BR, BL, in pixels) onto the whole image."""
    check_image(image)
    height, width = image.shape[:2]
    output_corners = [(0, 0), (width, 0), (width, height), (0, height)]
    coeffs = perspective_coeffs(output_corners, source_corners)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3, 4):
        raise ValueError(f"warp_perspective: expected 1, 3 or 4 channels, got {image.shape}")
    plane = image.reshape(height, width) if channels == 1 else image  # PIL wants HxW for grey
    pil = Image.fromarray(np.ascontiguousarray(plane))
    warped = pil.transform(
        (width, height),
        Image.Transform.PERSPECTIVE,
        tuple(coeffs.tolist()),
        resample=Image.Resampling.BILINEAR,
    )
    return np.array(warped).reshape(image.shape)  # a writable copy, same layout as the input


# The 8 elements of the dihedral group of the square, element 0 the identity.
DIHEDRAL = (
    None,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """Dihedral element `k` (0..7, see `DIHEDRAL`) of an HxW or HxWxC image."""
    method = DIHEDRAL[k]
    return np.ascontiguousarray(image) if method is None else transpose(image, method)


def flip_horizontal(image: np.ndarray) -> np.ndarray:
    """The mirror image (left-right) of an HxW or HxWxC image, as a new array.

    torch's flip: 9 us at 128 px, against 33 us through PIL and 80 us for a numpy copy of
    the reversed view.
    """
    check_image(image)
    return torch.flip(_as_tensor(image), dims=(1,)).numpy()


def transpose(image: np.ndarray, method: Image.Transpose) -> np.ndarray:
    """A flip, quarter turn or transpose of a 1-, 3- or 4-channel image, as a new array.

    Through PIL: its C loops copy 3-byte pixels about twice as fast as a strided numpy copy
    (33 vs 72 us at 128 px).
    """
    check_image(image)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"transpose: expected 1, 3 or 4 channels, got image of shape {image.shape}"
        )
    plane = image.reshape(image.shape[:2]) if channels == 1 else image  # PIL wants HxW for grey
    out = np.array(Image.fromarray(np.ascontiguousarray(plane)).transpose(method))
    return out.reshape(out.shape[:2] + image.shape[2:])


# ----------------------------------------------------------------------------- checks
def _as_tensor(image: np.ndarray) -> torch.Tensor:
    """A torch view of `image`, without torch's warning for read-only arrays.

    torch cannot mark a tensor read-only, so it warns on arrays from Ray's object store; the
    kernels here only read their input, so the warning is noise.
    """
    if any(stride < 0 for stride in image.strides):
        image = np.ascontiguousarray(image)
    if image.flags.writeable:
        return torch.from_numpy(image)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(image)


def check_image(image: np.ndarray) -> None:
    """Refuse anything but a non-empty HxW or HxWxC uint8 array, naming what it got."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise TypeError(f"expected an HxW or HxWxC uint8 numpy array, got {describe(image)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")


def describe(obj: object) -> str:
    """A short description of a value for error messages."""
    if isinstance(obj, np.ndarray):
        return f"array of shape {obj.shape} and dtype {obj.dtype}"
    return type(obj).__name__
