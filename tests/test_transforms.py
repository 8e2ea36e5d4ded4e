"""Item transforms: the contract every one keeps, then what each one does.

The pure pixel functions they wrap are tested in `test_kernels.py`.
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from pipeline.kernels import random_resized_crop_box, resize
from pipeline.transforms import (
    TRAIN_SCALE,
    VALID_ZOOM,
    CenterCrop,
    Compose,
    HorizontalFlip,
    PerspectiveWarp,
    RandomDihedral,
    RandomResizedCrop,
    ResizeShorter,
    ToRGB,
    compose,
    default_tfms,
    item_chain,
    train_tfms,
    valid_tfms,
)
from tests.image_fixtures import photo, readonly

H, W, SIZE = 40, 56, 16
# (transform, possible output shapes for an H x W x 3 input, draws randomness?)
CASES = [
    (ToRGB(), [(H, W, 3)], False),
    (ResizeShorter(24), [(24, round(W * 24 / H), 3)], False),
    (CenterCrop(SIZE), [(SIZE, SIZE, 3)], False),
    (RandomResizedCrop(SIZE), [(SIZE, SIZE, 3)], True),
    (RandomResizedCrop(SIZE, scale=(0.35, 1)), [(SIZE, SIZE, 3)], True),
    (PerspectiveWarp(0.2, p=1.0), [(H, W, 3)], True),
    (PerspectiveWarp(), [(H, W, 3)], True),
    (HorizontalFlip(), [(H, W, 3)], True),
    (RandomDihedral(), [(H, W, 3), (W, H, 3)], True),
    (train_tfms(SIZE), [(SIZE, SIZE, 3)], True),
    (valid_tfms(SIZE), [(SIZE, SIZE, 3)], False),
]
IDS = [repr(case[0]).split("(")[0] + str(i) for i, case in enumerate(CASES)]


@pytest.mark.parametrize("tfm, shapes, random_", CASES, ids=IDS)
def test_uint8_exact_shape_contiguous(tfm, shapes, random_):
    for seed in range(8):
        out = tfm(photo(H, W), np.random.default_rng(seed))
        assert out.dtype == np.uint8
        assert out.shape in shapes
        assert out.flags.c_contiguous


@pytest.mark.parametrize("tfm, shapes, random_", CASES, ids=IDS)
def test_read_only_input_is_accepted_and_left_unchanged(tfm, shapes, random_):
    original = photo(H, W)
    image = readonly(original)
    for seed in range(8):
        tfm(image, np.random.default_rng(seed))
    assert np.array_equal(image, original)
    assert not image.flags.writeable


@pytest.mark.parametrize("tfm, shapes, random_", CASES, ids=IDS)
def test_pickle_round_trip_gives_the_same_output(tfm, shapes, random_):
    copy = pickle.loads(pickle.dumps(tfm))
    image = photo(H, W)
    for seed in range(4):
        expected = tfm(image, np.random.default_rng(seed))
        assert np.array_equal(copy(image, np.random.default_rng(seed)), expected)


@pytest.mark.parametrize("tfm, shapes, random_", CASES, ids=IDS)
def test_output_depends_only_on_the_rng_seed(tfm, shapes, random_):
    image = photo(H, W)
    outputs = [tfm(image, np.random.default_rng(seed)).tobytes() for seed in range(12)]
    again = [tfm(image, np.random.default_rng(seed)).tobytes() for seed in range(12)]
    assert outputs == again
    distinct = len(set(outputs))
    assert distinct > 1 if random_ else distinct == 1


@pytest.mark.parametrize("tfm, shapes, random_", CASES, ids=IDS)
def test_global_random_state_is_neither_used_nor_touched(tfm, shapes, random_):
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    before = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state())
    image = photo(H, W)
    first = tfm(image, np.random.default_rng(3))
    np.random.seed(2), random.seed(2), torch.manual_seed(2)  # a different global state ...
    assert np.array_equal(tfm(image, np.random.default_rng(3)), first)  # ... same output
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    tfm(image, np.random.default_rng(3))
    after = (np.random.get_state()[1], random.getstate(), torch.get_rng_state())
    assert np.array_equal(before[0], after[0]) and before[1] == after[1]
    assert torch.equal(before[2], after[2])


# ----------------------------------------------------------------------------- resize, centre crop
@pytest.mark.parametrize(
    "h, w, expected", [(40, 56, (24, 34)), (56, 40, (34, 24)), (10, 10, (24, 24))]
)
def test_resize_shorter_keeps_the_aspect_ratio(h, w, expected):
    assert ResizeShorter(24)(photo(h, w), np.random.default_rng(0)).shape == (*expected, 3)


def test_center_crop_is_the_centre_square():
    image = photo(40, 56)
    out = CenterCrop(16)(image, np.random.default_rng(0))
    assert np.array_equal(out, image[12:28, 20:36])


def test_center_crop_scales_up_a_small_image_instead_of_padding():
    image = np.full((6, 20, 3), 200, np.uint8)
    out = CenterCrop(16)(image, np.random.default_rng(0))
    assert out.shape == (16, 16, 3) and (out == 200).all()


# ----------------------------------------------------------------------------- random resized crop
def test_random_resized_crop_is_one_resample_of_the_drawn_box():
    image = photo(40, 56)
    tfm = RandomResizedCrop(16, scale=(0.35, 1))
    for seed in range(5):
        top, left, h, w = random_resized_crop_box(
            40, 56, tfm.scale, tfm.ratio, np.random.default_rng(seed)
        )
        expected = resize(image[top : top + h, left : left + w], 16, 16)
        assert np.array_equal(tfm(image, np.random.default_rng(seed)), expected)


SHAPES = [(1, 1), (1, 300), (300, 1), (3, 500), (7, 13), (64, 64), (2, 3)]
SCALES = [(0.08, 1.0), (1.0, 1.0), (0.001, 0.001), (0.35, 1.0)]
RATIOS = [(3 / 4, 4 / 3), (1.0, 1.0), (0.1, 0.1), (10.0, 10.0), (0.01, 100.0)]


@pytest.mark.parametrize("shape", SHAPES)
def test_random_resized_crop_never_fails_on_odd_images_and_extremes(shape):
    image = photo(*shape)
    for scale in SCALES:
        for ratio in RATIOS:
            tfm = RandomResizedCrop(8, scale=scale, ratio=ratio)
            for seed in range(4):
                top, left, h, w = random_resized_crop_box(
                    *shape, scale, ratio, np.random.default_rng(seed)
                )
                assert top >= 0 and top + h <= shape[0] and h >= 1
                assert left >= 0 and left + w <= shape[1] and w >= 1
                assert tfm(image, np.random.default_rng(seed)).shape == (8, 8, 3)


def test_random_resized_crop_validates_its_arguments():
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(8, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        RandomResizedCrop(8, ratio=(0, 1))
    with pytest.raises(ValueError, match="size"):
        RandomResizedCrop(0)


# ----------------------------------------------------------------------------- flips
def test_horizontal_flip_mirrors_with_probability_p():
    image = photo(9, 13)
    assert np.array_equal(
        HorizontalFlip(p=1)(readonly(image), np.random.default_rng(0)), image[:, ::-1]
    )
    assert np.array_equal(HorizontalFlip(p=0)(image, np.random.default_rng(0)), image)
    flips = [
        not np.array_equal(HorizontalFlip()(image, np.random.default_rng(s)), image)
        for s in range(200)
    ]
    assert 60 < sum(flips) < 140


def test_random_dihedral_probability():
    image = photo(9, 9)
    assert all(
        np.array_equal(RandomDihedral(p=0)(image, np.random.default_rng(s)), image)
        for s in range(20)
    )
    outs = {RandomDihedral(p=1)(image, np.random.default_rng(s)).tobytes() for s in range(200)}
    assert len(outs) == 8


# ----------------------------------------------------------------------------- perspective
@pytest.mark.parametrize("shape", [(30, 50, 3), (7, 5, 3), (2, 2, 3), (64, 64, 1), (9, 1, 3)])
def test_perspective_warp_never_pads_with_black(shape):
    white = np.full(shape, 255, np.uint8)
    for seed in range(100):
        out = PerspectiveWarp(0.25, p=1)(white, np.random.default_rng(seed))
        assert out.shape == shape and (out == 255).all()


def test_perspective_warp_changes_the_image_and_validates_magnitude():
    image = photo(30, 40)
    assert not np.array_equal(PerspectiveWarp(0.2, p=1)(image, np.random.default_rng(0)), image)
    assert np.array_equal(PerspectiveWarp(0.2, p=0)(image, np.random.default_rng(0)), image)
    with pytest.raises(ValueError, match="magnitude"):
        PerspectiveWarp(0.4)


# ----------------------------------------------------------------------------- compose
class SetCorner:
    """Writes `value` into pixel (0, 0) of a copy: the last one applied wins."""

    def __init__(self, order: int, value: int):
        self.order, self.value = order, value

    def __call__(self, image, rng):
        out = image.copy()
        out[0, 0] = self.value
        return out


def test_compose_sorts_by_order_and_keeps_ties_in_the_given_order():
    tfms = [SetCorner(5, 1), SetCorner(1, 2), SetCorner(5, 3)]
    out = compose(tfms)(photo(4, 4), np.random.default_rng(0))
    assert out[0, 0].tolist() == [3, 3, 3]
    assert [t.value for t in compose(tfms).tfms] == [2, 1, 3]
    swapped = compose([SetCorner(5, 3), SetCorner(1, 2), SetCorner(5, 1)])
    assert swapped(photo(4, 4), np.random.default_rng(0))[0, 0].tolist() == [1, 1, 1]


def test_compose_refuses_a_transform_without_order_and_names_a_bad_output():
    with pytest.raises(TypeError, match="order"):
        compose([lambda image, rng: image])

    class ToFloat:
        order = 50

        def __call__(self, image, rng):
            return image.astype(np.float32)

    with pytest.raises(TypeError, match="ToFloat"):
        compose([ToFloat()])(photo(4, 4), np.random.default_rng(0))


def test_default_pipelines_on_any_input_give_size_square_rgb():
    inputs = [
        photo(40, 56),
        photo(56, 40, channels=None),
        photo(5, 5, channels=4),
        photo(1, 30),
        photo(300, 200),
    ]
    for tfms in (train_tfms(16), valid_tfms(16)):
        assert isinstance(tfms, Compose)
        for image in inputs:
            out = tfms(readonly(image), np.random.default_rng(0))
            assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_default_pipelines_say_what_the_decoder_must_deliver():
    assert train_tfms(128).decode_size == 128
    assert valid_tfms(128).decode_size == round(128 * VALID_ZOOM) == 146


# ----------------------------------------------------------------------------- chain size
CHAINS = {
    "train": lambda: train_tfms(24),
    "valid": lambda: valid_tfms(24),
    "crop then flips and warp": lambda: compose(
        [RandomDihedral(p=1), PerspectiveWarp(0.2, p=1), HorizontalFlip(p=1),
         CenterCrop(24), ToRGB()]),
    "resize, crop, resize": lambda: compose([ResizeShorter(40), CenterCrop(30),
                                             RandomResizedCrop(24), ToRGB()]),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_a_chain_makes_the_size_it_declares(name):
    """The stream trusts `chain.size` to allocate its batches: it must be what comes out."""
    chain = CHAINS[name]()
    assert chain.size == 24
    for height, width in ((40, 56), (300, 200), (7, 9), (24, 24)):
        for seed in range(3):
            out = chain(readonly(photo(height, width, seed=seed)), np.random.default_rng(seed))
            assert out.shape == (chain.size, chain.size, 3)
    assert pickle.loads(pickle.dumps(chain)).size == 24  # it travels to the actors with it


def test_a_chain_without_a_fixed_square_declares_no_size():
    assert compose([ToRGB(), HorizontalFlip()]).size is None

    class Border:  # runs after the crops and says its output depends on its input
        order, output_size = 50, None

        def __call__(self, image, rng):
            return np.pad(image, ((1, 1), (1, 1), (0, 0)))

    assert compose([CenterCrop(16), Border()]).size is None
    assert compose([ResizeShorter(20), CenterCrop(16)]).size == 16  # sorted: the crop is last
    assert compose([ToRGB()], size=16).size == 16  # a transform of your own that sets it
    with pytest.raises(ValueError, match="size"):
        compose([ToRGB()], size=0)


def test_item_chain_takes_the_size_from_the_transforms():
    assert repr(item_chain(None, "train", 48)) == repr(train_tfms(48))
    assert repr(item_chain(None, "valid", 48)) == repr(default_tfms("valid", 48))
    assert item_chain(None, "valid").size == 128
    custom = [ToRGB(), CenterCrop(40)]
    assert item_chain(custom, "train").size == 40
    assert item_chain(custom, "train", 40).size == 40  # agreeing is allowed
    with pytest.raises(ValueError, match="size=32 disagrees with item_tfms, which end at 40"):
        item_chain(custom, "train", 32)
    with pytest.raises(ValueError, match="do not say what size they end at"):
        item_chain([ToRGB(), ResizeShorter(40)], "train")
    chain = compose(custom)
    assert item_chain(chain, "valid") is chain
    with pytest.raises(ValueError, match="do not say what size"):
        item_chain(lambda image, rng: image, "valid")  # a bare callable


def test_valid_pipeline_is_resize_then_centre_crop():
    image = photo(73, 91)
    resized = ResizeShorter(18)(image, None)
    assert np.array_equal(
        valid_tfms(16)(image, np.random.default_rng(0)), CenterCrop(16)(resized, None)
    )


def test_default_training_crop_keeps_most_of_a_centred_object():
    # a white 64x64 square in the middle of a 160x260 picture, the rest black
    image = np.zeros((160, 260, 3), np.uint8)
    image[48:112, 98:162] = 255
    shown = []  # the share of the square each crop keeps
    for seed in range(300):
        out = train_tfms(64)(image, np.random.default_rng(seed))
        top, left, crop_h, crop_w = random_resized_crop_box(
            160, 260, TRAIN_SCALE, (3 / 4, 4 / 3), np.random.default_rng(seed)
        )
        inside = image[top : top + crop_h, left : left + crop_w, 0] == 255
        shown.append(inside.sum() / 64**2)
        assert (out[..., 0] > 127).any()
    assert min(shown) > 0.9  # with the course's 35% crops, as little as a quarter
