"""Item transforms on uint8 images: `(HWC uint8 array, rng) -> HWC uint8 array`.

Every transform is a small picklable object (Ray ships it to the actors) with an `order`;
`compose` sorts by `order` and applies them in turn. Two rules keep an epoch reproducible and
safe on Ray: a transform never writes into its input (arrays from Ray's object store are
read-only) and draws every random number from the `numpy.random.Generator` it is given, so the
same `(seed, epoch)` gives the same pixels.

Work stays in uint8 (bytes are cheaper to move and resample than floats); float conversion and
normalisation happen later, on the trainer's device.

The pixel work itself is in `pipeline.kernels` (plain functions); the classes here add the
randomness, the checks and the `order`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from pipeline.kernels import (
    center_crop_box,
    check_image,
    describe,
    dihedral,
    flip_horizontal,
    random_resized_crop_box,
    resize,
    shorter_side_size,
    to_rgb,
    warp_perspective,
)

DEFAULT_SIZE = 128  # the default chains' side when a stream is given neither size nor tfms
TRAIN_SCALE = (0.6, 1.0)  # area share of the training crop; see train_tfms
VALID_ZOOM = 1.14  # valid images: shorter side resized to size*1.14, then centre-cropped to size


class ItemTransform(Protocol):
    """What `compose` expects: an `order` and a pure call on (image, rng).

    A transform that sets the image's shape says so with an `output_size` attribute: an int
    for a size x size square (the crops), None for a shape that depends on the input
    (`ResizeShorter`). One without the attribute keeps the shape it is given.
    """

    order: int

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


# ----------------------------------------------------------------------------- transforms
class ToRGB:
    """Grey, grey+alpha, RGB or RGBA -> RGB (alpha composited on white); see `to_rgb`."""

    order = 0

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


class ResizeShorter:
    """Resize so the shorter side is `size`, keeping the aspect ratio (up or down)."""

    order = 10
    output_size = None  # the longer side follows the input's aspect ratio

    def __init__(self, size: int):
        self.size = _check_size(size, "ResizeShorter")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return resize(image, *shorter_side_size(image.shape[0], image.shape[1], self.size))

    def __repr__(self) -> str:
        return f"ResizeShorter({self.size})"


class CenterCrop:
    """The centred size x size square.

    An image smaller than `size` on a side has its shorter side resized up to `size` first, so
    the output is always size x size and never padded with black.
    """

    order = 20

    def __init__(self, size: int):
        self.size = self.output_size = _check_size(size, "CenterCrop")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        check_image(image)
        if min(image.shape[:2]) < self.size:
            image = resize(image, *shorter_side_size(image.shape[0], image.shape[1], self.size))
        top, left = center_crop_box(image.shape[0], image.shape[1], self.size, self.size)
        return np.ascontiguousarray(image[top : top + self.size, left : left + self.size])

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomResizedCrop:
    """A random crop (area fraction in `scale`, aspect in `ratio`) resized to size x size.

    Crop and resize are one resample (the crop is a view, then one antialiased resize).
    """

    order = 20

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.size = self.output_size = _check_size(size, "RandomResizedCrop")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"RandomResizedCrop: need 0 < scale[0] <= scale[1] <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"RandomResizedCrop: need 0 < ratio[0] <= ratio[1], got {ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        check_image(image)
        top, left, crop_h, crop_w = random_resized_crop_box(
            image.shape[0], image.shape[1], self.scale, self.ratio, rng
        )
        return resize(image[top : top + crop_h, left : left + crop_w], self.size, self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class PerspectiveWarp:
    """With probability `p`, a random perspective warp that keeps the image size.

    Each corner of the source quadrilateral moves inward by up to `magnitude` of the width and
    of the height, so the quadrilateral stays inside the image and no black padding appears.
    `magnitude` is capped at 0.25: from 1/3 on, a corner can cross the diagonal of its
    neighbours, the quadrilateral turns concave and the projective map folds outside the
    image. The default 0.1 is about fastai's `max_warp=0.2` (which is in [-1, 1] units).
    """

    order = 30

    def __init__(self, magnitude: float = 0.1, p: float = 0.75):
        if not 0 <= magnitude <= 0.25:
            raise ValueError(f"PerspectiveWarp: need 0 <= magnitude <= 0.25, got {magnitude}")
        self.magnitude, self.p = float(magnitude), _check_p(p, "PerspectiveWarp")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        check_image(image)
        if rng.random() >= self.p or self.magnitude == 0:
            return np.ascontiguousarray(image)
        height, width = image.shape[:2]
        inset = rng.uniform(0, self.magnitude, size=(4, 2)) * (width, height)
        inward = np.array([(1, 1), (-1, 1), (-1, -1), (1, -1)])  # TL, TR, BR, BL
        corners = np.array([(0, 0), (width, 0), (width, height), (0, height)]) + inset * inward
        return warp_perspective(image, [tuple(c) for c in corners.tolist()])

    def __repr__(self) -> str:
        return f"PerspectiveWarp(magnitude={self.magnitude}, p={self.p})"


class HorizontalFlip:
    """Mirror left-right with probability `p`."""

    order = 40

    def __init__(self, p: float = 0.5):
        self.p = _check_p(p, "HorizontalFlip")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        check_image(image)
        if rng.random() < self.p:
            return flip_horizontal(image)
        return np.ascontiguousarray(image)

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class RandomDihedral:
    """With probability `p`, one of the 8 symmetries of the square (identity included).

    Quarter turns and transposes swap height and width of a non-square image.
    """

    order = 40

    def __init__(self, p: float = 0.75):
        self.p = _check_p(p, "RandomDihedral")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        check_image(image)
        if rng.random() >= self.p:
            return np.ascontiguousarray(image)
        return dihedral(image, int(rng.integers(8)))

    def __repr__(self) -> str:
        return f"RandomDihedral(p={self.p})"


# ----------------------------------------------------------------------------- composing
class Compose:
    """Apply transforms in `order` (stable for ties), checking each returns a uint8 image.

    The chain says what it makes, so a stream takes both from it and from nowhere else:
    - `size`: its output is `size` x `size` x 3; by default the `output_size` of the last
      transform that declares one (a crop), None when the output shape is not fixed.
    - `decode_size`, when set, is the shorter side the decoder must at least deliver for
      this chain; the stream passes it to `decode_image` so big JPEGs can be draft-decoded.
    """

    def __init__(self, tfms: Sequence[ItemTransform], decode_size: int | None = None,
                 size: int | None = None):
        for tfm in tfms:
            if not callable(tfm) or not isinstance(getattr(tfm, "order", None), int):
                raise TypeError(
                    f"item transform {tfm!r} needs to be callable with an int `order` "
                    "attribute (e.g. a class with `order = 50` and `__call__(image, rng)`)"
                )
        self.tfms = sorted(tfms, key=lambda tfm: tfm.order)
        self.decode_size = None if decode_size is None else _check_size(decode_size, "Compose")
        self.size = output_size(self.tfms) if size is None else _check_size(size, "Compose")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for tfm in self.tfms:
            image = tfm(image, rng)
            if (
                not isinstance(image, np.ndarray)
                or image.dtype != np.uint8
                or image.ndim not in (2, 3)
            ):
                raise TypeError(f"{tfm!r} must return a uint8 image array, got {describe(image)}")
        return np.ascontiguousarray(image)

    def __repr__(self) -> str:
        return f"Compose({self.tfms!r}, decode_size={self.decode_size}, size={self.size})"


def output_size(tfms: Sequence[ItemTransform]) -> int | None:
    """The side of the square `tfms` (in order) end at, from their `output_size`; None if
    the last one that sets the shape leaves it to the input, or none sets it."""
    size = None
    for tfm in tfms:
        size = getattr(tfm, "output_size", size)
    return size


def compose(tfms: Sequence[ItemTransform], decode_size: int | None = None,
            size: int | None = None) -> Compose:
    """Sort `tfms` by `order` and chain them into one `(image, rng) -> image` callable."""
    return Compose(tfms, decode_size=decode_size, size=size)


def train_tfms(size: int, scale: tuple[float, float] = TRAIN_SCALE) -> Compose:
    """The default training pipeline: RGB, random-resized crop to size x size, random
    horizontal flip.

    The crop keeps 60-100% of the image's area, not the course's 35-100%: in object-centred
    pictures a crop of a third of the image often cuts the object away, and the label is then
    wrong for what the model sees (on `tench sample`'s shapes, a 35% crop shows under 80% of
    the shape one time in five; a 60% crop, one in a hundred).
    """
    return Compose(
        [ToRGB(), RandomResizedCrop(size, scale=scale), HorizontalFlip()], decode_size=size
    )


def valid_tfms(size: int) -> Compose:
    """The default validation pipeline: RGB, shorter side to round(size*1.14), centre crop.

    The 1.14 zoom is the course's CenterCrop scale (and torchvision's 0.875 crop ratio): random
    crops make objects look larger in training, so validation zooms in a little to match.
    """
    resized = round(size * VALID_ZOOM)
    return Compose([ToRGB(), ResizeShorter(resized), CenterCrop(size)], decode_size=resized)


def default_tfms(split: str, size: int) -> Compose:
    """`train_tfms(size)` for the "train" split, `valid_tfms(size)` for any other."""
    return train_tfms(size) if split == "train" else valid_tfms(size)


def item_chain(item_tfms: Callable | Sequence[Callable] | None, split: str,
               size: int | None = None) -> Callable:
    """The chain a stream applies: the split's default at `size`, or `item_tfms` composed.

    The chain owns the output size; a `size` given beside `item_tfms` must agree with it.
    """
    if item_tfms is None:
        return default_tfms(split, DEFAULT_SIZE if size is None else size)
    if callable(item_tfms) and not hasattr(item_tfms, "order"):
        chain = item_tfms  # an already composed chain
    else:
        chain = compose(list(item_tfms) if isinstance(item_tfms, Sequence) else [item_tfms])
    declared = getattr(chain, "size", None)
    if declared is None:
        raise ValueError(f"item_tfms {chain!r} do not say what size they end at: end them "
                         "with a crop (CenterCrop, RandomResizedCrop), or compose them with "
                         "compose(tfms, size=N) when a transform of your own sets the size")
    declared = _check_size(declared, "item_tfms")
    if size is not None and size != declared:
        raise ValueError(f"size={size} disagrees with item_tfms, which end at {declared} x "
                         f"{declared}; leave out size (the transforms set it)")
    return chain


# ----------------------------------------------------------------------------- helpers
def _check_size(size: int, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name}: size must be a positive int, got {size!r}")
    return int(size)


def _check_p(p: float, name: str) -> float:
    if not 0 <= p <= 1:
        raise ValueError(f"{name}: probability p must be in [0, 1], got {p}")
    return float(p)
