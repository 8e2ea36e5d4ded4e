"""decode_image against PIL as the oracle, on real JPEG/PNG/... bytes made with PIL."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from pipeline.decode import DecodeError, _decode_jpeg_torchvision, decode_image, jpeg_size
from pipeline.kernels import resize

SOURCE = "train-000003.tar:0a1b2c3d"
# torchvision 0.29 deprecates its decoders in favour of TorchCodec; see pipeline/decode.py
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with a little noise, asymmetric so every rotation shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + 2 * y) % 256], axis=2
    )
    rgb[: height // 4, : width // 3] = (250, 20, 20)  # a red block in the top-left corner
    return np.clip(rgb + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def pil_oracle(data: bytes) -> np.ndarray:
    """What PIL makes of the bytes: EXIF transpose, then convert("RGB")."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def close(a: np.ndarray, b: np.ndarray, tol: int = 2) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b).max()) <= tol


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


# ----------------------------------------------------------------------------- JPEG
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil(orientation):
    data = with_orientation(Image.fromarray(photo(24, 40)), orientation)
    expected = pil_oracle(data)
    assert expected.shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))
    for out in (decode_image(data, "jpg", source=SOURCE), _decode_jpeg_torchvision(data)):
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        assert close(out, expected)


def test_exif_rotation_really_moves_the_red_corner():
    data = with_orientation(Image.fromarray(photo(24, 40)), 6)  # stored sideways: rotate 90 cw
    out = decode_image(data, "jpg")
    assert out.shape == (40, 24, 3)
    top_right = out[:8, -5:].mean(axis=(0, 1))
    assert top_right[0] > 200 and top_right[1] < 80


def test_cmyk_jpeg_comes_out_rgb():
    rgb = photo(24, 40)
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    for out in (decode_image(data, "jpg"), _decode_jpeg_torchvision(data)):
        assert out.shape == (24, 40, 3)
        assert close(out, pil_oracle(data))
        assert np.abs(out.astype(int) - rgb).mean() < 6  # the same picture, not inverted


def test_greyscale_jpeg_comes_out_as_three_equal_channels():
    grey = photo(24, 40)[:, :, 1]
    data = encode(Image.fromarray(grey), "JPEG", quality=95)
    for out in (decode_image(data, "jpg"), _decode_jpeg_torchvision(data)):
        assert out.shape == (24, 40, 3)
        assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(
            out[:, :, 0], out[:, :, 2]
        )
        assert close(out, pil_oracle(data))


def test_progressive_jpeg():
    data = encode(Image.fromarray(photo(30, 20)), "JPEG", progressive=True, optimize=True)
    assert close(decode_image(data, "jpg"), pil_oracle(data))


# ----------------------------------------------------------------------------- draft mode
@pytest.mark.parametrize("target", [16, 37, 64, 75, 100, 149, 150, 151, 200, 300])
def test_draft_decodes_smaller_but_never_below_the_target(target):
    data = encode(Image.fromarray(photo(300, 400)), "JPEG", quality=90)
    out = decode_image(data, "jpg", target_size=target)
    assert min(out.shape[:2]) >= target
    if 2 * target <= 300:  # draft mode: fewer pixels decoded, the same picture
        assert out.shape[0] * out.shape[1] < 300 * 400
        full = decode_image(data, "jpg")
        assert np.abs(out.astype(int) - resize(full, *out.shape[:2])).mean() < 6
        drafted = Image.open(io.BytesIO(data))
        drafted.draft("RGB", (target, target))
        assert close(out, np.asarray(drafted.convert("RGB")))
    else:
        assert out.shape == (300, 400, 3)


def test_draft_keeps_exif_orientation():
    data = with_orientation(Image.fromarray(photo(120, 160)), 6)
    out = decode_image(data, "jpg", target_size=32)
    assert out.shape == (80, 60, 3)  # 1/2 scale of 120x160 (120 // 32 = 3 -> 2), then rotated
    full = decode_image(data, "jpg")
    assert full.shape == (160, 120, 3)
    assert np.abs(out.astype(int) - resize(full, 80, 60)).mean() < 6


def test_jpeg_size_reads_the_frame_header():
    image = Image.fromarray(photo(30, 47))
    samples = [
        encode(image, "JPEG"),
        encode(image, "JPEG", progressive=True),
        encode(image.convert("L"), "JPEG"),
        encode(image.convert("CMYK"), "JPEG"),
        with_orientation(image, 6),
    ]
    for data in samples:
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size == (47, 30)
    assert jpeg_size(encode(image, "PNG")) is None
    assert jpeg_size(samples[0][:40]) is None


# ----------------------------------------------------------------------------- PNG and others
def test_palette_png_with_a_transparent_index_is_white_there():
    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    data = encode(pal, "PNG", transparency=0)
    out = decode_image(data, "png", source=SOURCE)
    assert out.shape == (2, 4, 3)
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent black -> white
    assert out[0, 1].tolist() == [255, 0, 0]


def test_palette_png_with_partial_alpha_is_composited():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    pal.putdata([0, 1])
    data = encode(pal, "PNG", transparency=bytes([255, 128]))
    out = decode_image(data, "png")
    half = round((0 * 128 + 255 * 127) / 255)
    assert out.tolist() == [[[0, 0, 255], [255, half, half]]]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_png_is_composited_on_white(mode):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 60
    rgba[..., 3] = [[0, 255], [255, 0]]
    image = Image.fromarray(rgba).convert(mode)
    out = decode_image(encode(image, "PNG"), "png")
    assert out[0, 0].tolist() == [255] * 3 and out[0, 1].tolist() == [60] * 3


def test_greyscale_png_with_a_transparent_value():
    grey = Image.fromarray(np.array([[10, 200]], np.uint8))
    out = decode_image(encode(grey, "PNG", transparency=10), "png")
    assert out.tolist() == [[[255] * 3, [200] * 3]]


def test_16bit_greyscale_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32768, 65535, 40000]], np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
    out = decode_image(data, "png")
    expected = np.round(values / 257).astype(np.uint8)
    assert out.shape == (1, 6, 3) and np.array_equal(out[:, :, 0], expected)


def png_16bit_rgb(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand: PIL cannot write one."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    height, width, _ = values.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16bit_rgb_png():
    values = (np.random.default_rng(0).integers(0, 65536, (3, 5, 3))).astype(np.uint16)
    out = decode_image(png_16bit_rgb(values), "png")
    assert out.shape == (3, 5, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - values / 257).max() <= 1


FORMATS = ["PNG", "BMP", "TIFF", "GIF"] + (["WEBP"] if features.check("webp") else [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_formats_match_pil(fmt):
    image = Image.fromarray(photo(12, 20))
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(image, fmt, **options)
    out = decode_image(data, fmt.lower())
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    assert np.array_equal(out, pil_oracle(data))
    if fmt != "GIF":  # GIF quantises to a palette
        assert np.array_equal(out, np.asarray(image))


def test_cmyk_tiff():
    rgb = photo(12, 20)
    data = encode(Image.fromarray(rgb).convert("CMYK"), "TIFF")
    assert close(decode_image(data, "tiff"), pil_oracle(data), tol=0)


def test_format_comes_from_the_bytes_not_the_extension():
    image = photo(6, 9)
    assert np.array_equal(decode_image(encode(Image.fromarray(image), "PNG"), "jpg"), image)


# ----------------------------------------------------------------------------- bad data
def test_truncated_jpeg_is_a_decode_error_naming_the_source():
    data = encode(Image.fromarray(photo(40, 60)), "JPEG")
    for cut in (len(data) // 2, len(data) - 2, 40):
        with pytest.raises(DecodeError, match=SOURCE) as info:
            decode_image(data[:cut], "jpg", source=SOURCE)
        assert "jpg" in str(info.value)
    with pytest.raises(DecodeError, match="(?i)truncated"):
        decode_image(data[: len(data) // 2], "jpg", source=SOURCE)
    with pytest.raises(DecodeError, match="(?i)truncated"):  # the draft path too
        decode_image(data[: len(data) // 2], "jpg", target_size=8, source=SOURCE)


@pytest.mark.parametrize(
    "data, ext",
    [
        (b"", "jpg"),
        (b"not an image at all", "png"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 30, "jpg"),
        (encode(Image.fromarray(photo(20, 20)), "PNG")[:60], "png"),
    ],
    ids=["empty", "garbage", "jpeg-magic-garbage", "truncated-png"],
)
def test_corrupt_bytes_are_a_decode_error(data, ext):
    with pytest.raises(DecodeError, match=SOURCE):
        decode_image(data, ext, source=SOURCE)
    assert issubclass(DecodeError, ValueError)
