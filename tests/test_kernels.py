"""pipeline.kernels: the pure uint8 pixel functions, against PIL and numpy as oracles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.kernels import (
    DIHEDRAL,
    center_crop_box,
    check_image,
    dihedral,
    flip_horizontal,
    perspective_coeffs,
    random_resized_crop_box,
    resize,
    shorter_side_size,
    to_rgb,
    transpose,
    warp_perspective,
)
from tests.image_fixtures import photo, readonly


# ----------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((4, 4, 3), np.float32), TypeError),
        (np.zeros((4,), np.uint8), TypeError),
        (np.zeros((2, 4, 4, 3), np.uint8), TypeError),
        ([[0, 1], [2, 3]], TypeError),
        (np.zeros((0, 4, 3), np.uint8), ValueError),
        (np.zeros((4, 0), np.uint8), ValueError),
    ],
)
def test_every_kernel_refuses_what_is_not_an_image(bad, error):
    with pytest.raises(error, match="uint8 numpy array|empty image"):
        check_image(bad)
    for kernel in (to_rgb, flip_horizontal, lambda a: resize(a, 3, 3),
                   lambda a: transpose(a, Image.Transpose.ROTATE_90)):
        with pytest.raises(error):
            kernel(bad)


def test_an_unchanged_input_comes_back_as_itself():
    """Nothing to do costs no copy: an RGB image to to_rgb, a same-size resize, dihedral 0."""
    image = readonly(photo(6, 8))
    assert to_rgb(image) is image
    assert resize(image, 6, 8) is image
    assert dihedral(image, 0) is image
    strided = photo(6, 16)[:, ::2]  # not contiguous: comes back as a contiguous copy
    assert resize(strided, 6, 8).flags.c_contiguous and np.array_equal(resize(strided, 6, 8),
                                                                      strided)


# ----------------------------------------------------------------------------- to_rgb
def test_to_rgb_grey_repeats_the_channel():
    grey = photo(5, 7, channels=None)
    for image in (grey, grey[:, :, None]):
        out = to_rgb(readonly(image))
        assert out.shape == (5, 7, 3)
        assert all(np.array_equal(out[:, :, c], grey) for c in range(3))


def test_to_rgb_composites_alpha_on_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = (200, 10, 0)
    rgba[0, :, 3] = (0, 255, 128)  # transparent, opaque, half
    out = to_rgb(rgba)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 10, 0]
    expected = [round((v * 128 + 255 * 127) / 255) for v in (200, 10, 0)]
    assert out[0, 2].tolist() == expected
    grey_alpha = np.array([[[40, 0], [40, 255]]], np.uint8)
    assert to_rgb(grey_alpha).tolist() == [[[255] * 3, [40] * 3]]


def test_to_rgb_refuses_what_is_not_an_image():
    with pytest.raises(ValueError, match="channels"):
        to_rgb(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        to_rgb(np.zeros((4, 4, 3), np.float32))


# ----------------------------------------------------------------------------- resize
@pytest.mark.parametrize(
    "src, dst", [((40, 56), (16, 22)), ((17, 9), (40, 21)), ((64, 64), (7, 5))]
)
def test_resize_matches_pil_antialiased_bilinear(src, dst):
    image = photo(*src)
    expected = np.asarray(Image.fromarray(image).resize(dst[::-1], Image.Resampling.BILINEAR))
    out = resize(readonly(image), *dst)
    assert out.shape == (*dst, 3)
    assert np.abs(out.astype(int) - expected).max() <= 2
    grey = resize(image[:, :, 0], *dst)
    assert grey.shape == dst and np.array_equal(grey, out[:, :, 0])


@pytest.mark.parametrize(
    "h, w, size, expected",
    [(40, 56, 24, (24, 34)), (56, 40, 24, (34, 24)), (10, 10, 24, (24, 24)),
     (1, 300, 8, (8, 2400)), (100, 101, 10, (10, 10))],
)
def test_shorter_side_size_keeps_the_aspect_ratio(h, w, size, expected):
    assert shorter_side_size(h, w, size) == expected


def test_center_crop_box_is_centred_and_rounds_towards_the_top_left():
    assert center_crop_box(40, 56, 16, 16) == (12, 20)
    assert center_crop_box(5, 8, 2, 3) == (1, 2)  # 1.5 and 2.5 round down
    assert center_crop_box(16, 16, 16, 16) == (0, 0)


# ----------------------------------------------------------------------------- random resized crop
def test_fallback_is_the_centred_largest_region_within_the_ratio():
    rng = np.random.default_rng(0)
    # a 100x100 image cannot hold a full-area crop of aspect 2: every attempt fails
    assert random_resized_crop_box(100, 100, (1, 1), (2, 2), rng) == (25, 0, 50, 100)
    assert random_resized_crop_box(100, 100, (1, 1), (0.5, 0.5), rng) == (0, 25, 100, 50)
    # a 1x300 strip: no crop of aspect 3/4..4/3 fits, fall back to the central 1x1
    assert random_resized_crop_box(1, 300, (0.9, 1), (3 / 4, 4 / 3), rng) == (0, 149, 1, 1)
    # aspect already inside the range: the whole image (attempts=0 goes straight to fallback)
    assert random_resized_crop_box(30, 35, (0.5, 1), (1, 2), rng, attempts=0) == (0, 0, 30, 35)


def test_retries_keep_drawing_the_area_from_the_whole_image():
    """The course shrank the area on every retry; here each retry draws from the same area."""
    areas = []
    for seed in range(200):
        # aspect ratios below 2 do not fit in height 100, so many first attempts fail
        _, _, h, w = random_resized_crop_box(
            100, 400, (0.5, 0.5), (0.25, 4), np.random.default_rng(seed)
        )
        areas.append(h * w)
    areas = np.array(areas)
    fallback = areas == 100 * 400
    assert fallback.sum() < 20  # rare
    assert np.all(np.abs(areas[~fallback] - 20_000) <= 0.02 * 20_000)


# ----------------------------------------------------------------------------- flips
@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_flip_horizontal_is_the_mirror_as_a_new_array(channels):
    image = readonly(photo(9, 13, channels=channels))
    out = flip_horizontal(image)
    assert np.array_equal(out, image[:, ::-1]) and out.flags.c_contiguous and out.flags.writeable
    assert not np.shares_memory(out, image)
    mirrored = photo(9, 13, channels=channels)[:, ::-1]  # a negative-stride view as input
    assert np.array_equal(flip_horizontal(mirrored), image)


def test_dihedral_gives_the_eight_symmetries():
    image = photo(9, 9)
    oracle = {
        np.ascontiguousarray(np.rot90(a, k)).tobytes()
        for a in (image, image.swapaxes(0, 1))
        for k in range(4)
    }
    outs = [dihedral(readonly(image), k) for k in range(8)]
    assert len(DIHEDRAL) == 8 and {o.tobytes() for o in outs} == oracle
    assert np.array_equal(outs[0], image)
    assert dihedral(photo(9, 13), 1).shape == (13, 9, 3)
    assert dihedral(photo(9, 13, channels=None), 1).shape == (13, 9)


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_transpose_matches_numpy_and_keeps_the_channel_layout(channels):
    image = photo(5, 7, channels=channels)
    assert np.array_equal(transpose(readonly(image), Image.Transpose.TRANSPOSE),
                          image.swapaxes(0, 1))
    assert np.array_equal(transpose(image, Image.Transpose.ROTATE_180), image[::-1, ::-1])
    assert np.array_equal(transpose(image, Image.Transpose.FLIP_TOP_BOTTOM), image[::-1])
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        transpose(photo(5, 7, channels=2), Image.Transpose.ROTATE_90)


# ----------------------------------------------------------------------------- perspective
def apply_projective(coeffs, x, y):
    a, b, c, d, e, f, g, h = coeffs
    den = g * x + h * y + 1
    return (a * x + b * y + c) / den, (d * x + e * y + f) / den


def test_perspective_coeffs_map_each_corner_onto_its_source():
    rng = np.random.default_rng(0)
    output = [(0, 0), (50, 0), (50, 30), (0, 30)]
    for _ in range(20):
        source = [(x + rng.uniform(-5, 5), y + rng.uniform(-5, 5)) for x, y in output]
        coeffs = perspective_coeffs(output, source)
        assert coeffs.shape == (8,)
        for (x, y), (u, v) in zip(output, source, strict=True):
            assert np.allclose(apply_projective(coeffs, x, y), (u, v), atol=1e-9)


def test_perspective_coeffs_of_the_identity_and_of_a_pure_scale():
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    assert np.allclose(perspective_coeffs(square, square), [1, 0, 0, 0, 1, 0, 0, 0])
    doubled = [(2 * x, 2 * y) for x, y in square]
    assert np.allclose(perspective_coeffs(square, doubled), [2, 0, 0, 0, 2, 0, 0, 0])


def test_warp_of_an_axis_aligned_box_equals_pil_extent_crop():
    image = photo(30, 40)
    box = (4, 3, 36, 27)
    corners = [(box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])]
    expected = np.asarray(
        Image.fromarray(image).transform(
            (40, 30), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR
        )
    )
    assert np.abs(warp_perspective(readonly(image), corners).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("channels", [None, 1, 4])
def test_warp_keeps_grey_and_alpha_layouts_and_refuses_two_channels(channels):
    image = photo(12, 10, channels=channels)
    if channels == 4:
        image[:, :, 3] = 255  # PIL warps RGBA premultiplied: faint pixels' colours would shift
    whole = [(0, 0), (10, 0), (10, 12), (0, 12)]
    out = warp_perspective(readonly(image), whole)
    assert out.shape == image.shape and np.array_equal(out, image)  # the identity map
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        warp_perspective(photo(12, 10, channels=2), whole)
