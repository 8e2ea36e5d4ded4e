"""A small folder-labelled set of real photographs, made from the images scikit-image ships.

One class per source photograph; each image is a random crop (5-40% of the photo's area,
aspect 3:4 to 4:3) of it, maybe mirrored, with random brightness, contrast and saturation,
saved as a JPEG of 64-128 px. It is an easy set (a class is one scene, so colour and texture
alone go a long way) but the pixels are those of real photographs, not drawn shapes.

    OUT/train/<photo>/*.jpg, OUT/val/<photo>/*.jpg   (the layout `tench sample` writes)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# Photographs in scikit-image's own distribution (no download needed).
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "coins", "gravel")


def load_photo(name: str) -> Image.Image:
    import skimage.data  # the bench extra; imported here so the module lists without it

    array = getattr(skimage.data, name)()
    return Image.fromarray(np.asarray(array)).convert("RGB")


def random_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = photo.size
    area = rng.uniform(0.05, 0.4) * width * height
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = int(min(width, round(np.sqrt(area * aspect))))
    h = int(min(height, round(np.sqrt(area / aspect))))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    side = int(rng.integers(64, 129))
    view = photo.crop((left, top, left + w, top + h)).resize((side, round(side * h / w)))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhance(view).enhance(rng.uniform(0.7, 1.3))
    return view


def make_photo_set(out: str | Path, per_class: int, valid_per_class: int | None = None,
                   seed: int = 0) -> dict:
    """Write the set to `out`; return {"train": n, "val": n} image counts."""
    out = Path(out)
    valid_per_class = max(1, per_class // 4) if valid_per_class is None else valid_per_class
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for name in PHOTOS:
        photo = load_photo(name)
        for split, n in (("train", per_class), ("val", valid_per_class)):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                random_view(photo, rng).save(folder / f"{name}_{i:05d}.jpg", quality=90)
            counts[split] += n
    return counts
