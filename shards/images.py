"""Is this file an image tench can use? Decide the real format and decode every pixel.

The sharder runs `check_file` once per source file (in its worker processes), so nothing
corrupt reaches a shard: the bytes are opened by content, not by file name, fully
decoded (`Image.load()`), and refused with a short reason when they are empty, not an
image, truncated or corrupt, or over the decompression-bomb pixel limit. Images that
decode are kept with their ORIGINAL bytes under the extension of their real format
(a PNG named `.jpg` is stored as `png`); only formats outside `IMAGE_EXTS` are re-encoded
(to PNG, lossless), and `--max-size` re-encodes images whose shorter side is too long.

Colour conversion (CMYK, greyscale, palettes, 16-bit, alpha) is left to the stream's
decoder; here those images are only proven to decode. The per-channel histogram for the
mean/std statistics is taken on RGB pixels converted the same way the decoder converts them.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shards.format import IMAGE_EXTS

# Pillow format name -> the extension a shard stores. MPO is a camera JPEG with extra frames.
FORMAT_EXTS = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp",
    "GIF": "gif", "BMP": "bmp", "DIB": "bmp", "TIFF": "tiff",
}  # fmt: skip
JPEG_QUALITY = 90  # for images re-encoded by --max-size
# What Pillow's plugins raise on bad data; anything else is a bug and surfaces as itself.
DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# Short reasons, used to group skipped files in the summary and in meta.json.
EMPTY = "empty file"
UNREADABLE = "unreadable file"
NOT_IMAGE = "not an image"
CORRUPT = "corrupt image"
BOMB = "decompression bomb"


class BadImage(ValueError):
    """A file that cannot go into a shard; `kind` is one of the short reasons above."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class CheckedImage:
    """A file that decoded: the bytes to store, their extension, and what was learnt."""

    ext: str
    data: bytes
    width: int
    height: int
    mode: str  # Pillow's mode of the source (CMYK, P, I;16 ...): conversion happens at decode
    reencoded: bool
    histogram: list[int] | None  # 768 counts: R values 0-255, then G, then B


def pixel_limit(max_pixels: int | None) -> int | None:
    """The limit to apply: `max_pixels`, else Pillow's `MAX_IMAGE_PIXELS` (None: no limit)."""
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)


def check_file(
    path: str, *, max_pixels: int | None = None, max_size: int | None = None,
    want_histogram: bool = False,
) -> CheckedImage:  # fmt: skip
    """Read `path` and `check_image` its bytes; an unreadable file is a `BadImage` too."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImage(UNREADABLE, e.strerror or str(e)) from None
    return check_image(data, max_pixels=max_pixels, max_size=max_size,
                       want_histogram=want_histogram)


def check_image(
    data: bytes, *, max_pixels: int | None = None, max_size: int | None = None,
    want_histogram: bool = False,
) -> CheckedImage:  # fmt: skip
    """Fully decode `data`; return what to store, or raise `BadImage` saying why not.

    `max_pixels` refuses images with more pixels (default: Pillow's limit). `max_size`
    re-encodes an image whose shorter side is longer, shrunk to that side; smaller images
    keep their bytes. `want_histogram` adds the RGB histogram of the stored pixels.
    """
    if not data:
        raise BadImage(EMPTY, "0 bytes")
    limit = pixel_limit(max_pixels)
    # Pillow warns about what it tolerates (its bomb limit, odd EXIF, palette details): the
    # verdict here is kept or skipped, so its warnings would only be noise from the workers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = _open(data)
        width, height = image.size
        if limit is not None and width * height > limit:
            raise BadImage(
                BOMB, f"{width}x{height} = {width * height:,} pixels, over the limit of {limit:,}"
            )
        try:
            image.load()  # every pixel of the (first) frame: truncation and corruption show
            if "exif" in image.info or image.format == "TIFF":
                image.getexif()  # the stream applies EXIF orientation: bad EXIF fails there
        except DECODER_ERRORS as e:
            raise BadImage(CORRUPT, f"{image.format} {width}x{height}: {e}") from None
    ext = FORMAT_EXTS.get(image.format or "")
    mode = image.mode
    if max_size is not None and min(width, height) > max_size:
        image, data, ext = _shrink(image, ext, max_size)
        reencoded = True
    elif ext is None or ext not in IMAGE_EXTS:
        data, ext, reencoded = _encode(_storable(image), "png"), "png", True
    else:
        reencoded = False
    histogram = rgb_histogram(image) if want_histogram else None
    return CheckedImage(ext, data, width, height, mode, reencoded, histogram)


def _open(data: bytes) -> Image.Image:
    """`Image.open`, its errors as `BadImage`s.

    Pillow refuses outright (DecompressionBombError) an image over twice its own
    `MAX_IMAGE_PIXELS`, whatever `max_pixels` says; that is reported as a bomb too.
    """
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(BOMB, str(e)) from None
    except UnidentifiedImageError:
        raise BadImage(
            NOT_IMAGE, f"{len(data)} bytes in no format Pillow reads"  # never quote content
        ) from None
    except DECODER_ERRORS as e:
        raise BadImage(CORRUPT, str(e)) from None


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB, converted as `pipeline.decode` converts (kept in step by a test).

    16-bit grey is scaled rather than clipped; transparency is composited on white.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.uint16)
        colour, alpha = rgba[:, :, :3], rgba[:, :, 3:]
        return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def rgb_histogram(image: Image.Image) -> list[int]:
    """768 pixel counts (R 0-255, G, B) of `image` as RGB; Pillow counts RGB and L directly."""
    if image.mode == "RGB":
        return image.histogram()
    if image.mode == "L" and "transparency" not in image.info:
        return image.histogram() * 3  # grey: the same counts in each channel
    return Image.fromarray(rgb_pixels(image)).histogram()


def shrunk_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is `max_size`, aspect ratio kept."""
    scale = max_size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink(image: Image.Image, ext: str | None, max_size: int) -> tuple[Image.Image, bytes, str]:
    """Upright, shrunk, re-encoded: JPEG stays JPEG (quality 90), anything else becomes PNG."""
    image = _storable(ImageOps.exif_transpose(image))  # the new file carries no orientation tag
    image = image.resize(
        shrunk_size(*image.size, max_size), Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    if ext == "jpg" and image.mode in ("RGB", "L"):
        return image, _encode(image, "jpg"), "jpg"
    return image, _encode(image, "png"), "png"


def _storable(image: Image.Image) -> Image.Image:
    """A mode PNG and the resizer both handle: L, LA, RGB or RGBA (16-bit grey scaled)."""
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(rgb_pixels(image)[:, :, 0])
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


def _encode(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


def histogram_stats(histogram: np.ndarray) -> dict:
    """{"mean": [r, g, b], "std": [r, g, b]} on a 0-1 scale from summed RGB histograms."""
    counts = np.asarray(histogram, dtype=np.float64).reshape(3, 256)
    values = np.arange(256) / 255.0
    n = counts.sum(axis=1)
    if not n.all():
        return {"mean": [0.0, 0.0, 0.0], "std": [0.0, 0.0, 0.0]}
    mean = (counts * values).sum(axis=1) / n
    var = (counts * (values - mean[:, None]) ** 2).sum(axis=1) / n
    return {"mean": mean.round(6).tolist(), "std": np.sqrt(var).round(6).tolist()}


def file_size(path: str) -> int:
    """Bytes on disk, 0 when the file cannot be stat-ed (reading it will say why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
