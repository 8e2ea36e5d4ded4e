"""`tench sample OUT`: an offline, folder-labelled image set in the ImageNet layout.

Ten classes of drawn shapes and patterns (`OUT/train/<class>/*.jpg`, `OUT/val/...`),
each image with its own random colours, size, position, rotation, gradient background,
stray lines and pixel noise: easy enough for a small CNN to learn in minutes, hard
enough that it has to. Images are 160 px on the shorter side (like Imagenette-160) and
160-260 px on the longer, mostly JPEG with every tenth PNG. The same seed and counts
give the same bytes, because every image draws from its own seeded generator.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (
    "checker", "circle", "cross", "diamond", "dots",
    "ring", "square", "star", "stripes", "triangle",
)  # fmt: skip
SPLIT_FOLDERS = ("train", "val")
SHORT_SIDE = 160
LONG_SIDE = (160, 260)
PNG_EVERY = 10  # one image in ten is PNG
TMP_NAME = ".tench-sample.partial"
RADIUS = (0.18, 0.34)  # shape radius, as a share of the shorter side
REACH = 1.15  # farthest point of any shape from its centre, in radii (a turned square: 1.13)
CENTRE_KEPT = 0.875  # the share of the shorter side a validation centre crop keeps (1 / 1.14)

Colour = tuple[int, int, int]


def _rotated(cx: float, cy: float, r: float, angle: float, unit_points) -> list[tuple]:
    """Scale unit-circle points by `r`, rotate by `angle`, move to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in unit_points]


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> list[tuple]:
    angles = [phase + 2 * math.pi * k / n for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _draw_shape(
    draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, angle: float,
    colour: Colour, rng: np.random.Generator,
) -> None:  # fmt: skip
    """Draw one instance of class `name` centred at (cx, cy) with radius about `r`."""
    poly = lambda pts: draw.polygon(_rotated(cx, cy, r, angle, pts), fill=colour)  # noqa: E731
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "ring":
        width = max(3, int(r * rng.uniform(0.18, 0.32)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    elif name == "square":
        poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif name == "diamond":  # a rhombus, clearly longer than wide (a turned square is not one)
        w = rng.uniform(0.45, 0.6)
        poly([(0, -1), (w, 0), (0, 1), (-w, 0)])
    elif name == "triangle":
        poly(_regular(3))
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)
        outer, inner_pts = _regular(5), _regular(5, inner, math.pi / 5)
        poly([p for pair in zip(outer, inner_pts, strict=True) for p in pair])
    elif name == "cross":
        w = rng.uniform(0.22, 0.32)
        poly([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
              (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)])  # fmt: skip
    elif name == "stripes":  # in the same 1.6r square as checker (its corners stay within REACH)
        n = int(rng.integers(3, 6))
        band = 1.6 / (2 * n - 1)
        for k in range(n):
            y0 = -0.8 + 2 * k * band
            poly([(-0.8, y0), (0.8, y0), (0.8, y0 + band), (-0.8, y0 + band)])
    elif name == "checker":
        n = int(rng.integers(3, 5))
        cell = 1.6 / n
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    x0, y0 = -0.8 + i * cell, -0.8 + j * cell
                    poly([(x0, y0), (x0 + cell, y0), (x0 + cell, y0 + cell), (x0, y0 + cell)])
    elif name == "dots":
        for _ in range(int(rng.integers(5, 10))):
            d = r * math.sqrt(rng.uniform(0, 1)) * 0.85
            a = rng.uniform(0, 2 * math.pi)
            dr = r * rng.uniform(0.13, 0.2)
            x, y = cx + d * math.cos(a), cy + d * math.sin(a)
            draw.ellipse([x - dr, y - dr, x + dr, y + dr], fill=colour)
    else:
        raise ValueError(f"unknown sample class {name!r}; expected one of {CLASSES}")


def _far_colour(rng: np.random.Generator, away_from: np.ndarray) -> Colour:
    """A random colour that stands out from `away_from` (so the shape is visible)."""
    for _ in range(50):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - away_from).sum() >= 150:
            break
    return tuple(int(c) for c in colour)


def place_shape(w: int, h: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(cx, cy, r): a random radius, and a random centre that keeps the whole shape inside the
    centred square a validation centre crop keeps. A shape off at one end of a long image
    would be cut away by that crop, and its label would then be wrong for what is seen."""
    short = min(w, h)
    r = short * rng.uniform(*RADIUS)
    room = short * CENTRE_KEPT / 2 - r * REACH
    return w / 2 + rng.uniform(-room, room), h / 2 + rng.uniform(-room, room), r


def draw_image(name: str, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `name`, every choice drawn from `rng`."""
    long = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
    w, h = (long, SHORT_SIDE) if rng.random() < 0.5 else (SHORT_SIDE, long)

    # background: a linear gradient between two colours at a random angle, built as a
    # 256-step palette indexed per pixel (a (H, W, 3) float blend is 4x slower)
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    a = rng.uniform(0, 2 * math.pi)
    t = (np.arange(h, dtype=np.float32)[:, None] * math.sin(a)
         + np.arange(w, dtype=np.float32)[None, :] * math.cos(a))  # (H, W), by broadcasting
    t -= t.min()
    t *= 255 / max(float(t.max()), 1.0)
    steps = np.linspace(0, 1, 256)[:, None]
    palette = (c1 + steps * (c2 - c1)).astype(np.uint8)  # (256, 3)
    image = Image.fromarray(palette[t.astype(np.uint8)], "RGB")
    draw = ImageDraw.Draw(image)

    # stray lines, so the shape is not the only thing in the picture
    for _ in range(int(rng.integers(0, 4))):
        x0, x1 = rng.uniform(0, w, 2)
        y0, y1 = rng.uniform(0, h, 2)
        line_colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([(x0, y0), (x1, y1)], fill=line_colour, width=int(rng.integers(1, 4)))

    cx, cy, r = place_shape(w, h, rng)
    colour = _far_colour(rng, (c1 + c2) / 2)
    _draw_shape(draw, name, cx, cy, r, rng.uniform(0, 2 * math.pi), colour, rng)

    # uniform pixel noise in int16 (cheaper to draw than Gaussian; a CNN cannot tell)
    amplitude = int(rng.integers(5, 31))
    noisy = rng.integers(-amplitude, amplitude + 1, (h, w, 3), dtype=np.int16)
    noisy += np.asarray(image)
    np.clip(noisy, 0, 255, out=noisy)
    return Image.fromarray(noisy.astype(np.uint8), "RGB")


def encode_image(image: Image.Image, fmt: str, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, "PNG", compress_level=1)  # fast; the bytes are still deterministic
    else:
        image.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; pick another OUT")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"{out}: not empty; pass --force to replace its train/ and val/ folders"
        )


def make_sample(
    out: str | Path, per_class: int = 100, valid_per_class: int | None = None,
    seed: int = 0, force: bool = False,
) -> dict[str, dict[str, int]]:  # fmt: skip
    """Write the sample set to `out`; return `{"train": {class: n}, "val": {class: n}}`.

    `valid_per_class` defaults to a quarter of `per_class` (at least 1). Images are first
    written under a hidden folder in `out` and moved into place when all are done, so an
    interrupted run leaves no half-filled class folder behind (`get_files` skips hidden).
    `force` replaces `out/train` and `out/val`; nothing else in `out` is touched.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if valid_per_class is None:
        valid_per_class = max(1, round(per_class / 4))
    if valid_per_class < 0:
        raise ValueError(f"valid_per_class must be 0 or more, got {valid_per_class}")
    out = Path(out)
    _check_out(out, force)
    tmp = out / TMP_NAME
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    counts: dict[str, dict[str, int]] = {}
    per_split = {"train": per_class, "val": valid_per_class}
    for split_index, (split, n) in enumerate(per_split.items()):
        counts[split] = {}
        for class_index, name in enumerate(CLASSES):
            folder = tmp / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_index, class_index, i])
                fmt = "png" if (class_index * n + i) % PNG_EVERY == 0 else "jpg"
                data = encode_image(draw_image(name, rng), fmt, rng)
                (folder / f"{name}_{i:05d}.{fmt}").write_bytes(data)
            counts[split][name] = n
    for split in SPLIT_FOLDERS:
        if (out / split).exists():
            shutil.rmtree(out / split)
        os.replace(tmp / split, out / split)
    tmp.rmdir()
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", type=Path, help="folder to write train/ and val/ to")
    parser.add_argument("--per-class", type=int, default=100, help="train images per class")
    parser.add_argument(
        "--valid-per-class", type=int, default=None, help="val images per class (default N/4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--force", action="store_true", help="replace OUT/train and OUT/val")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        counts = make_sample(args.out, args.per_class, args.valid_per_class, args.seed, args.force)
    except (FileExistsError, ValueError) as e:
        print(f"tench sample: {e}")
        return 2
    seconds = time.perf_counter() - start
    n_train, n_valid = (sum(counts[s].values()) for s in SPLIT_FOLDERS)
    print(
        f"wrote {n_train} train + {n_valid} val images of {len(CLASSES)} classes to {args.out} "
        f"in {seconds:.1f}s ({(n_train + n_valid) / max(seconds, 1e-9):.0f} images/s)"
    )
    return 0
