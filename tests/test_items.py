import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.blocks import (
    CategoryProcessor,
    LabelError,
    grandparent_splitter,
    parent_labeler,
    random_splitter,
    regex_labeler,
)
from shards.items import ImageList, ItemList, LabeledData, SplitData, compose


class Add:
    def __init__(self, n, order):
        self.n, self.order = n, order

    def __call__(self, x):
        return x + [self.n]


# --- compose and ItemList --------------------------------------------------------------


def test_compose_sorts_by_order_and_keeps_ties_in_given_order():
    tfms = [Add("late", 20), Add("first", 0), Add("tie", 0), Add("mid", 10)]
    assert compose([], tfms) == ["first", "tie", "mid", "late"]
    assert compose(3, [lambda x: x * 2]) == 6  # no `order`: 0
    assert [t.n for t in tfms] == ["late", "first", "tie", "mid"]  # not sorted in place


def test_indexing_int_negative_slice_list_and_mask():
    il = ItemList(range(10, 20))
    assert il[0] == 10 and il[-1] == 19
    assert il[2:5] == [12, 13, 14]
    assert il[[0, 9, -2]] == [10, 19, 18]
    assert il[[i % 3 == 0 for i in range(10)]] == [10, 13, 16, 19]
    assert il[np.array([1, 2])] == [11, 12]
    assert il[np.arange(10) > 7] == [18, 19]
    assert il[np.int64(4)] == 14
    torch = pytest.importorskip("torch")
    assert il[torch.arange(10) > 7] == [18, 19]  # a bool tensor is a mask, not indices 0/1
    assert il[torch.tensor([3, 1])] == [13, 11] and il[torch.tensor(2)] == 12
    assert len(il) == 10 and list(il) == list(range(10, 20))


def test_bad_indices_say_why():
    il = ItemList("abc")
    with pytest.raises(IndexError, match="out of range"):
        il[3]
    with pytest.raises(IndexError, match="mask of length 2 for 3"):
        il[[True, False]]
    with pytest.raises(TypeError, match="cannot index"):
        il["a"]


def test_transforms_applied_on_indexing_only():
    calls = []

    def record(x):
        calls.append(x)
        return x

    il = ItemList([[1], [2]], tfms=[Add(9, 5), record])
    assert calls == []
    assert il[1] == [2, 9] and calls == [[2]]  # record (order 0) ran before Add (order 5)
    assert il.items == [[1], [2]]  # raw items untouched


def test_repr_is_truncated():
    text = repr(ItemList(range(100), path="/data"))
    assert text.startswith("ItemList (100 items)")
    assert "9, ... (90 more)" in text and "99" not in text and "Path: /data" in text


def test_new_keeps_kind_path_and_tfms():
    tfm = Add(0, 1)
    il = ImageList(["a.jpg"], path="/x", tfms=[tfm])
    sub = il.new(["b.jpg"])
    assert type(sub) is ImageList and sub.path == Path("/x") and sub.tfms == [tfm]
    assert sub.items == ["b.jpg"] and il.items == ["a.jpg"]


# --- ImageList -------------------------------------------------------------------------


def _image(path: Path, size=(12, 8), colour=(200, 10, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)


@pytest.fixture
def folder(tmp_path):
    for split, classes in (("train", ["cat", "dog"]), ("val", ["cat", "dog"])):
        for name in classes:
            for i in range(3 if split == "train" else 2):
                _image(tmp_path / split / name / f"{name}_{i}.jpg", size=(10 + i, 8))
    _image(tmp_path / "train" / "dog" / "dog_9.PNG", fmt="PNG")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0")
    return tmp_path


def test_from_files_lists_images_only(folder):
    il = ImageList.from_files(folder)
    assert len(il) == 11 and il.path == folder
    assert all(Path(p).suffix.lower() in {".jpg", ".png"} for p in il.items)
    assert len(ImageList.from_files(folder, include=["val"])) == 4


def test_images_stay_on_disk_until_indexed(folder):
    il = ImageList.from_files(folder)
    victim = il.items[0]
    os.remove(victim)  # after construction: constructing must not have read it
    assert isinstance(il[1], Image.Image)  # others still load
    with pytest.raises(FileNotFoundError, match=Path(victim).name):
        il[0]


def test_get_decodes_fully_and_closes_the_file(folder):
    il = ImageList.from_files(folder)
    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    images = il[:]
    assert [im.size for im in images[:3]] == [(10, 8), (11, 8), (12, 8)]
    assert images[0].getpixel((0, 0))[0] > 150  # pixels really read
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) == fds_before


def test_image_transforms_run_in_order(folder):
    def grey(im):
        return im.convert("L")

    grey.order = 0  # a plain function may carry an order too

    class Half:
        order = 10

        def __call__(self, im):
            return im.resize((im.width // 2, im.height // 2))

    il = ImageList.from_files(folder, tfms=[Half(), grey])
    im = il[0]
    assert im.mode == "L" and im.size == (5, 4)


# --- split -> label --------------------------------------------------------------------


def test_split_then_label_with_shared_processor(folder):
    sd = ImageList.from_files(folder).split(grandparent_splitter)
    assert isinstance(sd, SplitData)
    assert (len(sd.train), len(sd.valid)) == (7, 4)
    ld = sd.label(parent_labeler)
    assert isinstance(ld, LabeledData)
    assert ld.train.processor is ld.valid.processor is ld.processor
    assert ld.vocab.names == ["cat", "dog"]
    x, y = ld.valid[0]
    assert isinstance(x, Image.Image) and y == 0
    assert ld.train.label_names == [parent_labeler(p) for p in ld.train.x.items]
    assert ld.valid.y == [0, 0, 1, 1]
    pairs = ld.train[[0, -1]]
    assert [y for _, y in pairs] == [0, 1]


def test_vocab_comes_from_train_only(folder):
    _image(folder / "val" / "fox" / "fox_0.jpg")
    sd = ImageList.from_files(folder).split(grandparent_splitter)
    with pytest.raises(LabelError, match=r"'fox'.*fox_0\.jpg"):
        sd.label(parent_labeler)
    ld = sd.label(parent_labeler, CategoryProcessor(unseen="other"))
    assert ld.vocab.names == ["cat", "dog", "other"]
    assert ld.valid.label_names.count("other") == 1


def test_label_with_a_fitted_processor_keeps_its_vocab(folder):
    proc = CategoryProcessor().fit(["dog", "cat", "emu"])
    ld = ImageList.from_files(folder).split(grandparent_splitter).label(parent_labeler, proc)
    assert ld.vocab.names == ["cat", "dog", "emu"]
    assert set(ld.train.y) == {0, 1}


def test_flat_folder_random_split_and_regex_labels(tmp_path):
    for name in ("ant", "bee"):
        for i in range(20):
            _image(tmp_path / f"{name}_{i:02d}.png", fmt="PNG")
    il = ImageList.from_files(tmp_path)
    sd = il.split(random_splitter(0.25, seed=1, root=tmp_path))
    assert len(sd.train) + len(sd.valid) == 40 and 0 < len(sd.valid) < 20
    ld = sd.label(regex_labeler(r"^([a-z]+)_"))
    assert set(ld.train.label_names) == {"ant", "bee"}


# --- what is left out, and why ------------------------------------------------------------


def test_from_files_keeps_the_files_it_did_not_take_with_the_reason(folder):
    il = ImageList.from_files(folder)
    assert il.skipped == [(folder / "train/dog/notes.txt", "no image extension: .txt")]
    everything = ImageList.from_files(folder, extensions=None)
    assert len(everything) == 12 and everything.skipped == []
    pngs = ImageList.from_files(folder, extensions=["png"])
    assert pngs.items == [folder / "train/dog/dog_9.PNG"] and len(pngs.skipped) == 11
    assert pngs.skipped[0][1] == "extension not asked for: .jpg"


def test_split_adds_what_the_splitter_leaves_out_and_label_carries_it(folder):
    _image(folder / "stray.jpg")
    _image(folder / "test" / "cat" / "t.jpg")
    sd = ImageList.from_files(folder).split(grandparent_splitter, left_out="not train/val")
    assert [(p.relative_to(folder).as_posix(), why) for p, why in sd.skipped] == [
        ("train/dog/notes.txt", "no image extension: .txt"),
        ("stray.jpg", "not train/val"), ("test/cat/t.jpg", "not train/val")]
    assert sd.train.skipped == []  # the lists hold items; the split holds what it left out
    ld = sd.label(parent_labeler)
    assert ld.skipped == sd.skipped and ld.path == folder
    default = ImageList.from_files(folder).split(grandparent_splitter)
    assert default.skipped[-1] == (folder / "test/cat/t.jpg", "left out by the splitter")


def test_from_csv_takes_the_rows_and_reports_unlisted_files(folder):
    csv_path = folder.parent / "labels.csv"
    csv_path.write_text("path,label\nval/dog/dog_1.jpg,hound\ntrain/cat/cat_0.jpg,kitty\n"
                        "train/cat/cat_2.jpg,kitty\n")
    il = ImageList.from_csv(folder, csv_path)
    assert il.items == [folder / "train/cat/cat_0.jpg", folder / "train/cat/cat_2.jpg",
                        folder / "val/dog/dog_1.jpg"]  # sorted, whatever the CSV's order
    reasons = dict((p.relative_to(folder).as_posix(), why) for p, why in il.skipped)
    assert len(reasons) == 12 - 3
    assert reasons["train/dog/dog_9.PNG"] == "not in the labels CSV: labels.csv"
    assert reasons["train/dog/notes.txt"] == "no image extension: .txt"
    assert isinstance(il[0], Image.Image)


def test_from_csv_names_the_row_of_a_file_that_does_not_exist(folder):
    csv_path = folder.parent / "labels.csv"
    csv_path.write_text("path,label\ntrain/cat/cat_0.jpg,cat\ntrain/cat/cat_7.jpg,cat\n")
    with pytest.raises(LabelError, match=r"labels\.csv:3: 'train/cat/cat_7\.jpg' does not exist"):
        ImageList.from_csv(folder, csv_path)


def test_label_counts_every_file_it_cannot_label_and_names_the_first(folder):
    sd = ImageList.from_files(folder).split(grandparent_splitter)
    with pytest.raises(LabelError, match=r"^6 of the 11 files cannot be labelled; e\.g\. "
                                         r".*dog_0\.jpg: file name does not match"):
        sd.label(regex_labeler(r"^(cat)_"))  # the 5 cats match, the 6 dogs do not
    with pytest.raises(LabelError, match=r"^none of the 11 files can be labelled; e\.g\. "
                                         r".*cat_0\.jpg"):
        sd.label(regex_labeler(r"^(emu)_"))


def test_an_unseen_validation_label_names_the_label_and_the_file(folder):
    _image(folder / "val" / "fox" / "fox_0.jpg")
    sd = ImageList.from_files(folder).split(grandparent_splitter)
    with pytest.raises(LabelError, match=r"validation label 'fox' \(e\.g\. val/fox/fox_0\.jpg\) "
                                         r"has no training images.*\['cat', 'dog'\]"):
        sd.label(parent_labeler)


# --- to_shards ----------------------------------------------------------------------------


def test_the_notebook_flow_ends_in_shards(folder, tmp_path_factory):
    import json
    import tarfile

    out = tmp_path_factory.mktemp("shards") / "out"
    data = ImageList.from_files(folder).split(grandparent_splitter).label(parent_labeler)
    meta = data.to_shards(out, seed=3, processes=1, progress=False)
    assert meta["vocab"] == ["cat", "dog"] and meta["layout"] is None
    assert meta["splits"]["train"]["count"] == 7 and meta["splits"]["valid"]["count"] == 4
    notes = {"path": "train/dog/notes.txt", "reason": "no image extension: .txt"}
    assert meta["skipped"] == [notes]
    assert meta["source"] == str(folder.resolve()) and meta["options"]["seed"] == 3
    seen = {}
    for split, info in meta["splits"].items():
        for shard in info["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data_ in members.items():
                if name.endswith(".json"):
                    record = json.loads(data_)
                    index = int(members[name[: -len("json")] + "cls"])
                    seen[record["path"]] = (split, record["label"], index)
    assert len(seen) == 11
    for rel, (split, label, index) in seen.items():
        assert split == ("train" if rel.startswith("train/") else "valid")
        assert label == rel.split("/")[1] and index == meta["vocab"].index(label)
