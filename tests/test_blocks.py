import json
from pathlib import Path

import pytest

from shards.blocks import (
    CategoryProcessor,
    LabelError,
    func_splitter,
    grandparent_splitter,
    parent_labeler,
    partition_items,
    random_splitter,
    regex_labeler,
    split_items,
    top_folder_splitter,
)
from shards.files import get_files
from shards.vocab import Vocab

# --- splitters -------------------------------------------------------------------------


def test_grandparent_splitter_imagenet_layout():
    assert grandparent_splitter(Path("data/train/cat/a.jpg")) == "train"
    assert grandparent_splitter("data/val/cat/a.jpg") == "valid"
    assert grandparent_splitter(Path("data/valid/cat/a.jpg")) == "valid"
    assert grandparent_splitter(Path("data/test/cat/a.jpg")) is None
    assert grandparent_splitter(Path("data/cat/a.jpg")) is None


def test_grandparent_splitter_custom_names_and_single_string():
    assert grandparent_splitter("x/dev/c/a.jpg", valid_names="dev") == "valid"
    assert grandparent_splitter("x/v/c/a.jpg", valid_names="dev") is None
    assert grandparent_splitter("x/learn/c/a.jpg", train_name="learn") == "train"


def test_split_items_keeps_order_and_drops_none(tmp_path):
    for rel in ["train/b/2.jpg", "train/a/1.jpg", "val/a/3.jpg", "test/a/4.jpg", "val/b/5.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    files = get_files(tmp_path)
    train, valid = split_items(files, grandparent_splitter)
    rel = lambda ps: [p.relative_to(tmp_path).as_posix() for p in ps]  # noqa: E731
    assert rel(train) == ["train/a/1.jpg", "train/b/2.jpg"]
    assert rel(valid) == ["val/a/3.jpg", "val/b/5.jpg"]


def test_split_items_rejects_a_bad_answer():
    with pytest.raises(ValueError, match="'test'.*a.jpg|a.jpg.*'test'"):
        split_items([Path("a.jpg")], lambda p: "test")


def test_func_splitter_true_false_none():
    split = func_splitter(lambda p: None if p.stem == "x" else p.stem.startswith("v"))
    assert split_items([Path("v1"), Path("t1"), Path("x"), Path("v2")], split) == (
        [Path("t1")],
        [Path("v1"), Path("v2")],
    )


def _names(n):
    return [Path(f"root/c{i % 7}/img_{i:05d}.jpg") for i in range(n)]


def test_random_splitter_is_deterministic_and_near_pct():
    files = _names(2000)
    train1, valid1 = split_items(files, random_splitter(0.2, seed=1))
    train2, valid2 = split_items(files, random_splitter(0.2, seed=1))
    assert (train1, valid1) == (train2, valid2)
    assert 0.16 < len(valid1) / len(files) < 0.24
    _, valid_other_seed = split_items(files, random_splitter(0.2, seed=2))
    assert valid_other_seed != valid1


def test_random_splitter_adding_files_does_not_move_others():
    files = _names(500)
    _, valid = split_items(files, random_splitter(0.3, seed=7))
    more = files + [Path(f"root/new/n{i}.jpg") for i in range(300)]
    _, valid_more = split_items(more, random_splitter(0.3, seed=7))
    assert [p for p in valid_more if p in set(files)] == valid
    # order does not matter either
    _, valid_rev = split_items(list(reversed(files)), random_splitter(0.3, seed=7))
    assert sorted(valid_rev) == sorted(valid)


def test_random_splitter_root_makes_split_independent_of_location(tmp_path):
    rels = [f"c{i % 3}/{i}.jpg" for i in range(200)]
    a = [tmp_path / "a" / r for r in rels]
    b = [tmp_path / "elsewhere" / "b" / r for r in rels]
    _, va = split_items(a, random_splitter(0.25, 3, root=tmp_path / "a"))
    _, vb = split_items(b, random_splitter(0.25, 3, root=tmp_path / "elsewhere" / "b"))
    assert [p.relative_to(tmp_path / "a") for p in va] == [
        p.relative_to(tmp_path / "elsewhere" / "b") for p in vb
    ]
    assert va  # 200 files at 25%: some are valid


def test_random_splitter_extremes_and_bad_pct():
    files = _names(50)
    assert split_items(files, random_splitter(0.0))[1] == []
    assert split_items(files, random_splitter(1.0))[0] == []
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="valid_pct"):
            random_splitter(bad)


# --- labelers --------------------------------------------------------------------------


def test_parent_labeler():
    assert parent_labeler(Path("d/train/tench/x.jpg")) == "tench"
    assert parent_labeler("d/train/golf ball/ü.jpg") == "golf ball"


def test_regex_labeler_one_group_on_the_file_name_and_clear_errors():
    label = regex_labeler(r"^([a-z]+)_\d+\.")
    assert label(Path("any/where/tench_12.jpg")) == "tench"
    assert regex_labeler(r"^(.+)_\d+\.jpg$")("pets/great_pyrenees_12.jpg") == "great_pyrenees"
    assert regex_labeler(r"^((?:a|b)+)_")(Path("x_1/abba_2.png")) == "abba"  # name, not folder
    with pytest.raises(LabelError, match=r"Tench-12\.jpg.*regex"):
        label(Path("any/Tench-12.jpg"))
    with pytest.raises(ValueError, match="0 capturing groups, expected exactly 1"):
        regex_labeler(r"\d+")
    with pytest.raises(ValueError, match="2 capturing groups"):
        regex_labeler(r"^([a-z]+)_(\d+)")


def test_top_folder_splitter_splits_by_the_first_folder_under_root(tmp_path):
    split = top_folder_splitter(tmp_path)
    assert split(tmp_path / "train/cat/a.jpg") == split(tmp_path / "train/a.jpg") == "train"
    assert split(tmp_path / "val/a.jpg") == split(tmp_path / "valid/x/y/a.jpg") == "valid"
    assert split(tmp_path / "test/a.jpg") is None
    assert split(tmp_path / "train.jpg") is None  # a file directly in root
    for rel in ("train/cat/a.jpg", "val/dog/b.jpg", "other/cat/c.jpg"):  # = grandparent
        assert split(tmp_path / rel) == grandparent_splitter(tmp_path / rel)


def test_partition_items_keeps_what_the_splitter_leaves_out():
    sides = {1: "train", 2: "valid", 3: None, 4: "train"}
    assert partition_items([1, 2, 3, 4], sides.get) == ([1, 4], [2], [3])


# --- CategoryProcessor -----------------------------------------------------------------


def test_vocab_from_training_labels_only_sorted_and_applied_to_valid():
    proc = CategoryProcessor().fit(["dog", "cat", "dog", "bird"])
    assert proc.vocab.names == ["bird", "cat", "dog"]
    assert proc.encode(["cat", "dog", "bird"]) == [1, 2, 0]
    assert proc.decode([2, 0]) == ["dog", "bird"]
    # the same labels in another order give the same vocab
    assert CategoryProcessor().fit(["bird", "dog", "cat"]).vocab == proc.vocab


def test_unseen_validation_label_names_label_and_file():
    proc = CategoryProcessor().fit(["cat", "dog"])
    with pytest.raises(LabelError, match=r"'fox'.*val/fox/3\.jpg") as e:
        proc.encode(["cat", "fox"], sources=["val/cat/1.jpg", "val/fox/3.jpg"])
    assert "unseen='other'" in str(e.value)
    assert proc.vocab.names == ["cat", "dog"]  # unchanged


def test_unseen_other_maps_to_last_class():
    proc = CategoryProcessor(unseen="other").fit(["dog", "cat"])
    assert proc.vocab.names == ["cat", "dog", "other"]
    assert proc.encode(["fox", "cat", "emu"]) == [2, 0, 2]
    with pytest.raises(ValueError, match="other_name"):
        CategoryProcessor(unseen="other").fit(["other", "cat"])
    assert CategoryProcessor(unseen="other", other_name="_unk").fit(["other"]).vocab.names == [
        "other",
        "_unk",
    ]


def test_processor_needs_fit_and_labels_and_valid_policy():
    with pytest.raises(RuntimeError, match="fit"):
        CategoryProcessor().encode(["a"])
    with pytest.raises(ValueError, match="empty"):
        CategoryProcessor().fit([])
    with pytest.raises(ValueError, match="unseen"):
        CategoryProcessor(unseen="ignore")
    with pytest.raises(ValueError, match="2 labels but 1 sources"):
        CategoryProcessor().fit(["a"]).encode(["a", "a"], sources=["x"])


def test_save_load_round_trip_with_fingerprint(tmp_path):
    proc = CategoryProcessor(unseen="other").fit(["zèbre", "ant"])
    path = tmp_path / "vocab.json"
    proc.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["vocab"] == ["ant", "zèbre", "other"]
    assert data["vocab_fingerprint"] == Vocab(data["vocab"]).fingerprint
    loaded = CategoryProcessor.load(path)
    assert loaded.vocab == proc.vocab and loaded.unseen == "other"
    assert loaded.encode(["nope", "ant"]) == [2, 0]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_load_refuses_an_edited_vocab(tmp_path):
    path = tmp_path / "vocab.json"
    CategoryProcessor().fit(["a", "b"]).save(path)
    data = json.loads(path.read_text())
    data["vocab"] = ["b", "a"]  # swapped by hand: indices would silently change meaning
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="fingerprint"):
        CategoryProcessor.load(path)
