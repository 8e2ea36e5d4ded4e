import os
from pathlib import Path

import pytest

from shards.files import get_files, image_extensions, normalise_extensions, relative_path


def _touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def _rel(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


@pytest.fixture
def tree(tmp_path):
    _touch(
        tmp_path,
        "top.jpg",
        "notes.txt",
        "train/cat/b.JPG",
        "train/cat/a.jpeg",
        "train/cat/.DS_Store",
        "train/cat/._a.jpeg",
        "train/dog/c.Png",
        "train/dog/deep/d.webp",
        "val/cat/e.jpg",
        "val/dog/f.TIFF",
        ".git/objects/g.jpg",
        ".hidden_class/h.jpg",
    )
    return tmp_path


def test_image_extensions_are_lower_case_with_dots():
    for ext in (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"):
        assert ext in image_extensions
    assert all(e.startswith(".") and e == e.lower() for e in image_extensions)
    assert ".txt" not in image_extensions


def test_normalise_extensions_accepts_bare_and_mixed_case():
    assert normalise_extensions(["JPG", ".Png"]) == {".jpg", ".png"}
    assert normalise_extensions("jpg") == {".jpg"}
    assert normalise_extensions(None) is None


def test_recursive_sorted_hidden_skipped_case_insensitive(tree):
    files = get_files(tree, image_extensions)
    assert _rel(files, tree) == [
        "top.jpg",
        "train/cat/a.jpeg",
        "train/cat/b.JPG",
        "train/dog/c.Png",
        "train/dog/deep/d.webp",
        "val/cat/e.jpg",
        "val/dog/f.TIFF",
    ]
    assert files == sorted(files)
    assert all(isinstance(p, Path) for p in files)


def test_no_extension_filter_lists_every_visible_file(tree):
    names = _rel(get_files(tree), tree)
    assert "notes.txt" in names
    assert not any(part.startswith(".") for n in names for part in n.split("/"))


def test_extensions_given_in_upper_case(tree):
    assert _rel(get_files(tree, ["PNG", "TIFF"]), tree) == ["train/dog/c.Png", "val/dog/f.TIFF"]


def test_not_recursive_lists_only_the_top(tree):
    assert _rel(get_files(tree, image_extensions, recurse=False), tree) == ["top.jpg"]


def test_include_filters_top_level_folders_only(tree):
    files = _rel(get_files(tree, image_extensions, include=["val"]), tree)
    assert files == ["top.jpg", "val/cat/e.jpg", "val/dog/f.TIFF"]
    # a nested folder named like an included one is not special
    files = _rel(get_files(tree, image_extensions, include=["train"]), tree)
    assert "train/dog/deep/d.webp" in files and not any(f.startswith("val/") for f in files)


def test_order_is_deterministic_regardless_of_creation_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _touch(a, "z/1.jpg", "b/2.jpg", "a/3.jpg", "m.jpg")
    _touch(b, "a/3.jpg", "m.jpg", "b/2.jpg", "z/1.jpg")
    assert _rel(get_files(a), a) == _rel(get_files(b), b)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loop_terminates_and_lists_each_real_folder_once(tmp_path):
    _touch(tmp_path, "cls/a.jpg", "cls/sub/b.jpg")
    os.symlink(tmp_path, tmp_path / "cls" / "sub" / "loop")  # back to the root
    os.symlink(tmp_path / "cls", tmp_path / "cls" / "again")  # to its own folder
    files = _rel(get_files(tmp_path, [".jpg"]), tmp_path)
    assert files == ["cls/a.jpg", "cls/sub/b.jpg"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_folder_is_followed_once(tmp_path):
    _touch(tmp_path, "elsewhere/x.jpg")
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
    assert _rel(get_files(tmp_path / "data"), tmp_path / "data") == ["linked/x.jpg"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_dangling_file_symlink_is_listed_for_the_reader_to_report(tmp_path):
    _touch(tmp_path, "cls/a.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "cls" / "dangling.jpg")
    assert _rel(get_files(tmp_path), tmp_path) == ["cls/a.jpg", "cls/dangling.jpg"]


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        get_files(missing)


def test_file_instead_of_folder_names_it(tmp_path):
    _touch(tmp_path, "one.jpg")
    with pytest.raises(NotADirectoryError, match="one.jpg"):
        get_files(tmp_path / "one.jpg")


def test_empty_folder_gives_empty_list(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert get_files(tmp_path / "empty") == []


def test_accepts_str_path(tree):
    assert get_files(str(tree), [".webp"]) == [tree / "train/dog/deep/d.webp"]


def test_relative_path_by_string_or_os_path_gives_the_same_answer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path("images")
    assert relative_path(root / "train/cat/a.jpg", root) == "train/cat/a.jpg"  # by string
    assert relative_path("images/./train//a.jpg", "images/") == "train/a.jpg"
    assert relative_path(tmp_path / "images/b.jpg", "./images") == "b.jpg"  # through os.path
    assert relative_path("a/b.jpg", ".") == "a/b.jpg"
    assert relative_path("other/c.jpg", root) == "../other/c.jpg"
    assert relative_path("imagesX/d.jpg", root) == "../imagesX/d.jpg"  # not a mere prefix
