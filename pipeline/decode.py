"""Image bytes from a shard -> uint8 HxWx3 RGB array, EXIF orientation applied.

JPEGs go through torchvision's libjpeg-turbo decoder (`decode_jpeg`, EXIF orientation, CMYK
and greyscale handled, identical pixels to PIL); every other format, and any JPEG it refuses,
goes through PIL. When the caller's target is at least 2x smaller than the stored JPEG (shorter
side), PIL's draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients,
never below the target.

Measured on a shared 2-core machine, one thread, 200 photo JPEGs of 160 px shorter side
(~10 KB, quality 75-95), images/s per core (best of 3-5 runs; other jobs were running).
`bench/kernel_bench.py` prints each of these rates (on `tench sample` images, and one of them
upscaled to 1280x960) and the per-call costs quoted below:

    decode only (to a PIL image / tensor):   PIL 5,900          torchvision 6,100
    decode + resize shorter side to 128:     PIL + PIL resize   1,800-2,200
                                             torchvision + torch uint8 resize 2,400-2,800 (chosen)
    1280x960 JPEG (230 KB), 128 px target:   full decode 300, draft at 1/4 scale 425
                                             (+ resize: 245 vs 360; entropy decoding, which
                                             draft cannot skip, dominates at quality 90)

PNG decodes at the same rate in both (~1,100/s at 213x160), so PNG stays on PIL, which also
handles 16-bit greyscale, palettes and transparency the way this module wants.

torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (a DeprecationWarning,
hidden by Python's default filters outside `__main__`); tench pins torchvision 0.29.1.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode  # importing torchvision.io registers torch.ops.image

from pipeline.kernels import to_rgb

_DECODE_JPEG_OP = torch.ops.image.decode_jpeg  # torchvision's decoder (libjpeg-turbo)
DRAFT_FACTOR = 2  # draft-decode only when the stored shorter side is >= 2x the target
_JPEG_MAGIC = b"\xff\xd8\xff"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What PIL's plugins raise on bad data; anything else is a bug and should surface as itself.
_DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)


class DecodeError(ValueError):
    """Image bytes that could not be decoded; the message names the source and the reason."""


def decode_image(
    data: bytes, ext: str, target_size: int | None = None, source: str = "<bytes>"
) -> np.ndarray:
    """Decode `data` to an HxWx3 uint8 RGB array with EXIF orientation applied.

    `ext` is the record's extension (used in messages; the format is read from the bytes).
    `target_size`, when given, is the shorter side the caller will resize to: a JPEG at least
    twice that size is draft-decoded to a smaller size whose shorter side is still >= target.
    `source` names the sample (shard and key) in a `DecodeError`. The result may be read-only.
    """
    if not data:
        raise DecodeError(f"{source}: empty {ext} image")
    if data[:3] == _JPEG_MAGIC and not _wants_draft(data, target_size):
        try:
            return _decode_jpeg_torchvision(data)
        except RuntimeError:
            pass  # not something libjpeg-turbo here can do: PIL decides, and names the error
    return _decode_pil(data, ext, target_size, source)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header without decoding, or None if not found.

    Walks the marker segments up to the first SOF; a few microseconds, where `Image.open`
    costs ~20 us, for a decision made on every JPEG.
    """
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            if pos + 9 > end:
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image as an HxWx3 uint8 RGB array.

    16-bit greyscale is scaled (v * 255 / 65535) rather than clipped at 255 as PIL's
    `convert` would; anything with transparency (alpha band, palette or colour key) is
    composited on white like `transforms.to_rgb`; CMYK, YCbCr, palettes and 1-bit go through
    PIL's `convert("RGB")`.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return to_rgb(((values * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return to_rgb(np.asarray(image.convert("RGBA")))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _wants_draft(data: bytes, target_size: int | None) -> bool:
    if target_size is None:
        return False
    size = jpeg_size(data)
    return size is not None and min(size) >= DRAFT_FACTOR * target_size


def _decode_jpeg_torchvision(data: bytes) -> np.ndarray:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # the operator `decode_jpeg` calls after its per-call checks, usage logging and
    # deprecation warning (~8 us of ~170 per 160 px image); torchvision is pinned
    chw = _DECODE_JPEG_OP(encoded, ImageReadMode.RGB.value, True)  # True: EXIF orientation
    return np.ascontiguousarray(chw.permute(1, 2, 0).numpy())  # decoded HWC: already contiguous


def _decode_pil(data: bytes, ext: str, target_size: int | None, source: str) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
        big = target_size is not None and min(image.size) >= DRAFT_FACTOR * target_size
        if big and image.format == "JPEG":
            # scales by 1/2, 1/4 or 1/8 while both sides stay >= target_size
            image.draft("RGB", (target_size, target_size))
        image.load()
        return pil_to_rgb(ImageOps.exif_transpose(image))
    except _DECODER_ERRORS as error:
        raise DecodeError(
            f"{source}: cannot decode {ext} image ({len(data)} bytes): {error}"
        ) from error
