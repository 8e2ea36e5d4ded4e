"""`tench shard`'s labelers and splitters, through the command line, on real image files.

Each test shards a small tree with `tench shard`, then reads the shards back (webdataset
and tarfile, `read_shards`) to check every file's split and label.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.blocks import random_splitter
from shards.format import read_meta
from shards.sharder import ShardError, shard_folder
from tests.test_sharder import image_bytes, read_shards
from trainer.cli import main as cli_main

PETS = ("Abyssinian", "great_pyrenees", "pug")  # Oxford-IIIT Pets names: <breed>_<n>.jpg
PETS_REGEX = r"^(.+)_\d+\.jpg$"


def write(root: Path, rels) -> None:
    for i, rel in enumerate(rels):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(image_bytes(i, "PNG" if rel.endswith(".png") else "JPEG"))


def shard(*args: str) -> int:
    return cli_main(["shard", *map(str, args), "--processes", "1"])


def by_path(out: Path) -> dict[str, tuple[str, str, int]]:
    """{source path: (split, label name, label index)}, read from the shards."""
    return {s["info"]["path"]: (s["split"], s["info"]["label"], s["label"])
            for s in read_shards(out).values()}  # fmt: skip


def test_folder_labels_by_default_and_meta_options_unchanged(tmp_path):
    write(tmp_path / "src", ["train/cat/a.jpg", "train/dog/b.jpg", "val/cat/c.jpg"])
    assert shard(tmp_path / "src", tmp_path / "out") == 0
    assert by_path(tmp_path / "out") == {"train/cat/a.jpg": ("train", "cat", 0),
                                         "train/dog/b.jpg": ("train", "dog", 1),
                                         "val/cat/c.jpg": ("valid", "cat", 0)}  # fmt: skip
    meta = read_meta(tmp_path / "out")
    assert meta["layout"] == "imagenet"
    assert list(meta["options"]) == ["valid_pct", "seed", "shard_size", "max_count",
                                     "max_size", "max_pixels"]  # fmt: skip


def test_regex_labels_a_flat_pets_folder_split_at_random(tmp_path, capsys):
    src = tmp_path / "images"
    names = [f"{breed}_{i}.jpg" for breed in PETS for i in range(1, 9)]
    write(src, names)
    (src / "list.txt").write_text("not an image")
    assert shard(src, tmp_path / "out", "--label-regex", PETS_REGEX, "--valid-pct", "0.25",
                 "--seed", "4") == 0
    assert "skipped 1 files: 1 no image extension" in capsys.readouterr().out
    split = random_splitter(0.25, 4, root=src)
    got = by_path(tmp_path / "out")
    meta = read_meta(tmp_path / "out")
    assert meta["vocab"] == sorted(PETS) and meta["layout"] == "flat"
    assert meta["options"]["label_regex"] == PETS_REGEX
    assert set(got) == set(names)
    for name, (side, label, index) in got.items():
        assert label == name.rsplit("_", 1)[0] and index == meta["vocab"].index(label)
        assert side == split(src / name)
    assert {side for side, _, _ in got.values()} == {"train", "valid"}


def test_regex_labels_with_train_and_val_folders_and_no_class_folders(tmp_path):
    write(tmp_path / "src", ["train/pug_1.jpg", "train/x/pug_2.jpg", "train/Abyssinian_3.jpg",
                             "val/pug_4.jpg", "valid/Abyssinian_5.jpg", "test/pug_6.jpg"])
    assert shard(tmp_path / "src", tmp_path / "out", "--label-regex", PETS_REGEX) == 0
    assert by_path(tmp_path / "out") == {
        "train/pug_1.jpg": ("train", "pug", 1), "train/x/pug_2.jpg": ("train", "pug", 1),
        "train/Abyssinian_3.jpg": ("train", "Abyssinian", 0),
        "val/pug_4.jpg": ("valid", "pug", 1), "valid/Abyssinian_5.jpg": ("valid", "Abyssinian", 0)}
    meta = read_meta(tmp_path / "out")
    assert meta["skipped"] == [{"path": "test/pug_6.jpg", "reason": "outside the layout: not "
                                "in train/, val/ or valid/"}]  # fmt: skip


def test_a_regex_that_matches_no_file_or_not_every_file_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "images"
    write(src, [f"{breed}_{i}.jpg" for breed in PETS for i in range(1, 4)] + ["odd.jpg"])
    out = tmp_path / "out"
    assert shard(src, out, "--label-regex", r"^(.+)-\d+\.png$", "--valid-pct", "0.2") == 1
    err = capsys.readouterr().err
    assert "none of the 10 files can be labelled" in err and r"'^(.+)-\\d+\\.png$'" in err
    assert shard(src, out, "--label-regex", PETS_REGEX, "--valid-pct", "0.2") == 1
    err = capsys.readouterr().err
    assert "1 of the 10 files cannot be labelled; e.g." in err and "odd.jpg: file name" in err
    assert not out.exists()  # nothing written, not even OUT


def test_a_bad_regex_is_refused_before_listing(tmp_path, capsys):
    write(tmp_path / "src", ["a_1.jpg"])
    assert shard(tmp_path / "src", tmp_path / "out", "--label-regex", "(a)_(1)",
                 "--valid-pct", "0.5") == 1
    assert "2 capturing groups, expected exactly 1" in capsys.readouterr().err
    assert shard(tmp_path / "src", tmp_path / "out", "--label-regex", "(a",
                 "--valid-pct", "0.5") == 1
    assert "'(a' is not a regular expression" in capsys.readouterr().err


def kaggle(tmp_path: Path, rows: str) -> tuple[Path, Path]:
    """train/<id>.jpg images and a labels.csv next to them (outside SRC)."""
    src = tmp_path / "src"
    write(src, [f"train/{i:03d}.jpg" for i in range(8)] + ["val/100.jpg", "val/101.png"])
    (tmp_path / "labels.csv").write_text(rows)
    return src, tmp_path / "labels.csv"


def test_labels_csv_with_folder_split_skips_and_counts_unlisted_files(tmp_path, capsys):
    rows = "path,label\n" + "".join(f"train/{i:03d}.jpg,{'ab'[i % 2]}\n" for i in range(7))
    src, csv_path = kaggle(tmp_path, rows + "val/100.jpg,b\nval/101.png,a\n")
    assert shard(src, tmp_path / "out", "--labels-csv", csv_path) == 0
    assert "skipped 1 files: 1 not in the labels CSV" in capsys.readouterr().out
    got = by_path(tmp_path / "out")
    assert len(got) == 9 and got["val/100.jpg"] == ("valid", "b", 1)
    for i in range(7):
        assert got[f"train/{i:03d}.jpg"] == ("train", "ab"[i % 2], i % 2)
    meta = read_meta(tmp_path / "out")
    assert meta["skipped"] == [{"path": "train/007.jpg",
                                "reason": "not in the labels CSV: labels.csv"}]
    assert meta["options"]["labels_csv"] == str(csv_path)


def test_labels_csv_with_a_split_column_as_fastai_is_valid(tmp_path):
    src = tmp_path / "src"
    write(src, [f"img/{i}.jpg" for i in range(10)])
    rows = "".join(f"img/{i}.jpg,{'xy'[i % 2]},{i >= 7}\n" for i in range(10))
    (tmp_path / "l.csv").write_text("path,label,is_valid\n" + rows)
    meta = shard_folder(src, tmp_path / "out", labels_csv=tmp_path / "l.csv",
                        split_csv_column="is_valid", processes=2, progress=False)
    got = by_path(tmp_path / "out")
    assert got == {f"img/{i}.jpg": ("valid" if i >= 7 else "train", "xy"[i % 2], i % 2)
                   for i in range(10)}  # fmt: skip
    assert meta["layout"] == "csv" and meta["options"]["split_csv_column"] == "is_valid"


def test_labels_csv_with_a_random_split(tmp_path):
    src = tmp_path / "src"
    write(src, [f"{i}.jpg" for i in range(12)])
    (tmp_path / "l.csv").write_text("".join(f"{i}.jpg,{'pq'[i % 2]}\n" for i in range(12)))
    assert shard(src, tmp_path / "out", "--labels-csv", tmp_path / "l.csv",
                 "--valid-pct", "0.3", "--seed", "2") == 0
    split = random_splitter(0.3, 2, root=src)
    assert by_path(tmp_path / "out") == {
        f"{i}.jpg": (split(src / f"{i}.jpg"), "pq"[i % 2], i % 2) for i in range(12)}


def test_a_csv_row_naming_a_missing_file_is_an_error_naming_the_row(tmp_path, capsys):
    src, csv_path = kaggle(tmp_path, "path,label\ntrain/000.jpg,a\ntrain/001.jpg,b\n"
                                     "train/404.jpg,a\nval/100.jpg,b\n")
    assert shard(src, tmp_path / "out", "--labels-csv", csv_path) == 1
    err = capsys.readouterr().err
    assert f"{csv_path}:4: 'train/404.jpg' does not exist under {src}" in err
    assert not (tmp_path / "out").exists()


def test_a_bad_split_value_and_conflicting_flags_are_named(tmp_path):
    src, csv_path = kaggle(tmp_path, "path,label,fold\ntrain/000.jpg,a,train\n"
                                     "train/001.jpg,b,holdout\n")
    with pytest.raises(ShardError, match=r"labels\.csv:3: column 'fold' is 'holdout'"):
        shard_folder(src, tmp_path / "out", labels_csv=csv_path, split_csv_column="fold")
    with pytest.raises(ShardError, match="--split-csv-column names a column of --labels-csv"):
        shard_folder(src, tmp_path / "out", split_csv_column="fold")
    with pytest.raises(ShardError, match="--label-regex and --labels-csv both"):
        shard_folder(src, tmp_path / "out", labels_csv=csv_path, label_regex="(.)")
    with pytest.raises(ShardError, match="--valid-pct and --split-csv-column both"):
        shard_folder(src, tmp_path / "out", labels_csv=csv_path, split_csv_column="fold",
                     valid_pct=0.2)
    with pytest.raises(ShardError, match=r"no train/ folder.*--split-csv-column"):
        shard_folder(tmp_path / "src/train", tmp_path / "out", labels_csv=csv_path)
    with pytest.raises(ShardError, match="--processes must be at least 1, got 0"):
        shard_folder(src, tmp_path / "out", processes=0)


def test_help_names_every_labeler_and_splitter(capsys):
    with pytest.raises(SystemExit):
        cli_main(["shard", "--help"])
    text = capsys.readouterr().out
    for flag in ("--label-regex", "--labels-csv", "--valid-pct", "--split-csv-column",
                 "--processes", "is_valid", "Oxford-IIIT Pets", "to_shards"):
        assert flag in text, flag
    assert "--workers" not in text

