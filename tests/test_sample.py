import hashlib
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from shards.blocks import grandparent_splitter, parent_labeler, split_items
from shards.files import get_files, image_extensions
from shards.sample import (
    CENTRE_KEPT,
    CLASSES,
    LONG_SIDE,
    REACH,
    SHORT_SIDE,
    _draw_shape,
    make_sample,
    place_shape,
)
from trainer.cli import main as tench


def _digests(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in get_files(root)
    }


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    counts = make_sample(out, per_class=4, valid_per_class=2, seed=3)
    return out, counts


def test_counts_and_imagenet_layout(sample):
    out, counts = sample
    assert counts == {"train": dict.fromkeys(CLASSES, 4), "val": dict.fromkeys(CLASSES, 2)}
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(CLASSES)
        for name in CLASSES:
            assert len(list((out / split / name).iterdir())) == n
    assert all(c == c.lower() and c.isalpha() for c in CLASSES) and len(set(CLASSES)) == 10


def test_data_block_reads_it_back(sample):
    out, _ = sample
    files = get_files(out, image_extensions)
    train, valid = split_items(files, grandparent_splitter)
    assert (len(train), len(valid)) == (40, 20)
    assert {parent_labeler(p) for p in valid} == set(CLASSES)


def test_formats_match_extensions_mostly_jpeg_some_png(sample):
    out, _ = sample
    formats = {}
    for path in get_files(out):
        with Image.open(path) as im:
            assert im.format == {".jpg": "JPEG", ".png": "PNG"}[path.suffix]
            assert im.mode == "RGB"
            w, h = im.size
            im.load()  # fully decodable
        assert min(w, h) == SHORT_SIDE
        assert LONG_SIDE[0] <= max(w, h) <= LONG_SIDE[1]
        formats[im.format] = formats.get(im.format, 0) + 1
    assert 0 < formats["PNG"] < formats["JPEG"]
    assert formats["PNG"] / sum(formats.values()) == pytest.approx(0.1, abs=0.05)


def test_sizes_and_orientations_vary(tmp_path):
    make_sample(tmp_path, per_class=6, valid_per_class=0, seed=0)
    sizes = set()
    for path in get_files(tmp_path):
        with Image.open(path) as im:
            sizes.add(im.size)
    assert len(sizes) > 20
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


def test_same_seed_same_bytes_other_seed_differs(sample, tmp_path):
    out, _ = sample
    again = make_sample(tmp_path / "again", per_class=4, valid_per_class=2, seed=3)
    assert again == sample[1]
    assert _digests(tmp_path / "again") == _digests(out)
    make_sample(tmp_path / "other", per_class=4, valid_per_class=2, seed=4)
    other = _digests(tmp_path / "other")
    assert other.keys() == _digests(out).keys()
    assert all(other[k] != v for k, v in _digests(out).items())


@pytest.mark.parametrize("name", CLASSES)
def test_every_shape_stays_within_reach_of_its_centre(name):
    r = 60
    for seed in range(20):
        rng = np.random.default_rng(seed)
        canvas = Image.new("L", (200, 200), 0)
        _draw_shape(ImageDraw.Draw(canvas), name, 100, 100, r, rng.uniform(0, 2 * math.pi),
                    255, rng)  # fmt: skip
        ys, xs = np.nonzero(np.asarray(canvas))
        assert len(xs) > 0
        assert np.hypot(xs + 0.5 - 100, ys + 0.5 - 100).max() <= REACH * r + 1.5, (name, seed)


@pytest.mark.parametrize("size", [(160, 160), (260, 160), (160, 260), (213, 160)])
def test_the_shape_lies_inside_the_validation_centre_crop(size):
    w, h = size
    half = min(w, h) * CENTRE_KEPT / 2
    rs, xs = [], []
    for seed in range(500):
        cx, cy, r = place_shape(w, h, np.random.default_rng(seed))
        reach = REACH * r
        assert w / 2 - half <= cx - reach and cx + reach <= w / 2 + half
        assert h / 2 - half <= cy - reach and cy + reach <= h / 2 + half
        rs.append(r)
        xs.append(cx)
    assert max(rs) / min(rs) > 1.7  # sizes still vary, and so do positions
    assert max(xs) - min(xs) > 0.25 * min(w, h)


def test_images_of_a_class_differ(sample):
    out, _ = sample
    digests = _digests(out)
    assert len(set(digests.values())) == len(digests)


def test_default_valid_count_is_a_quarter(tmp_path):
    counts = make_sample(tmp_path, per_class=8, seed=0)
    assert set(counts["val"].values()) == {2}
    counts = make_sample(tmp_path / "one", per_class=1, seed=0)
    assert set(counts["val"].values()) == {1}


def test_refuses_non_empty_out_unless_force(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        make_sample(tmp_path, per_class=1, valid_per_class=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    make_sample(tmp_path, per_class=2, valid_per_class=1, force=True)
    make_sample(tmp_path, per_class=1, valid_per_class=1, force=True)  # replaces, not adds
    assert len(get_files(tmp_path / "train")) == 10
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "train", "val"]


def test_leftover_partial_folder_is_replaced(tmp_path):
    stale = tmp_path / ".tench-sample.partial" / "train" / "circle"
    stale.mkdir(parents=True)
    (stale / "junk.jpg").write_bytes(b"half")
    make_sample(tmp_path, per_class=1, valid_per_class=1, force=True)
    assert not (tmp_path / ".tench-sample.partial").exists()
    assert all(p.name != "junk.jpg" for p in get_files(tmp_path))


def test_bad_counts():
    with pytest.raises(ValueError, match="per_class"):
        make_sample("unused", per_class=0)
    with pytest.raises(ValueError, match="valid_per_class"):
        make_sample("unused", per_class=1, valid_per_class=-1)


def test_cli(tmp_path, capsys):
    out = tmp_path / "set"
    argv = ["sample", str(out), "--per-class", "2", "--valid-per-class", "1", "--seed", "5"]
    assert tench(argv) == 0
    assert "wrote 20 train + 10 val images of 10 classes" in capsys.readouterr().out
    assert len(get_files(out)) == 30
    assert tench(argv) == 2
    assert "--force" in capsys.readouterr().out
    assert tench([*argv, "--force"]) == 0
