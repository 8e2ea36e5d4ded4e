"""Ten classes of clean drawn shapes (48 px PNGs with pixel noise) in the folder layout
`tench shard` reads: learnable by the small CNN in a few epochs, and with edges, corners and
outlines a model learnt on some classes can reuse on the others (the fine-tuning tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "ring", "square", "frame", "triangle", "plus", "ex", "hstripes", "vstripes",
          "checker")


def draw(name: str, rng: np.random.Generator, side: int = 48) -> Image.Image:
    """One `name` shape (or texture), light on dark, at a jittered place and size."""
    bg = tuple(int(v) for v in rng.integers(0, 100, 3))
    fg = tuple(int(v) for v in rng.integers(150, 256, 3))
    img = Image.new("RGB", (side, side), bg)
    d = ImageDraw.Draw(img)
    c = side / 2 + rng.uniform(-4, 4, 2)
    r = rng.uniform(0.28, 0.4) * side
    box = [c[0] - r, c[1] - r, c[0] + r, c[1] + r]
    w = max(2, int(r * 0.3))
    if name == "circle":
        d.ellipse(box, fill=fg)
    elif name == "ring":
        d.ellipse(box, outline=fg, width=w)
    elif name == "square":
        d.rectangle(box, fill=fg)
    elif name == "frame":
        d.rectangle(box, outline=fg, width=w)
    elif name == "triangle":
        d.polygon([(c[0], c[1] - r), (c[0] + r, c[1] + r), (c[0] - r, c[1] + r)], fill=fg)
    elif name == "plus":
        d.rectangle([c[0] - w / 2, c[1] - r, c[0] + w / 2, c[1] + r], fill=fg)
        d.rectangle([c[0] - r, c[1] - w / 2, c[0] + r, c[1] + w / 2], fill=fg)
    elif name == "ex":
        d.line([(box[0], box[1]), (box[2], box[3])], fill=fg, width=w)
        d.line([(box[0], box[3]), (box[2], box[1])], fill=fg, width=w)
    elif name in ("hstripes", "vstripes"):
        period = int(rng.integers(6, 10))
        for k in range(0, side, period):
            d.rectangle([0, k, side, k + period // 2 - 1] if name == "hstripes"
                        else [k, 0, k + period // 2 - 1, side], fill=fg)
    elif name == "checker":
        cell = int(rng.integers(6, 10))
        for y in range(0, side, cell):
            for x in range(0, side, cell):
                if (x // cell + y // cell) % 2:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (side, side, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_set(folder: str | Path, classes, per_class: int, valid_per_class: int,
              seed: int = 0) -> None:
    """`folder/train/<class>/*.png` and `folder/val/...`; each image from its own seed."""
    for s, (split, n) in enumerate((("train", per_class), ("val", valid_per_class))):
        for name in classes:
            out = Path(folder) / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, s, SHAPES.index(name), i])
                draw(name, rng).save(out / f"{i:03d}.png")
