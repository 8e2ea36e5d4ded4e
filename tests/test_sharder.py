"""`tench shard`: real image folders in, real tar shards out, read back by webdataset + tarfile."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.blocks import random_splitter
from shards.format import decode_label, read_meta, sample_key
from shards.inspect import inspect_folder
from shards.sharder import ShardError, folder_data, shard_folder
from shards.workers import worker_context
from trainer.cli import main as cli_main

CLASSES = ("cat", "dog", "fish")


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> bytes:
    """A small picture with some structure: a random colour field plus a bright band."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    pixels[: h // 3] = rng.integers(0, 256, (h // 3, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_tree(root: Path, train: int = 8, valid: int = 3, classes=CLASSES,
              layout: str = "imagenet") -> dict[str, bytes]:
    """Write an image tree; return {path relative to root: bytes}. Every 4th image is PNG."""
    files = {}
    seed = 0
    for split, n in (("train", train), ("val", valid)):
        for label in classes:
            for i in range(n):
                seed += 1
                fmt, ext = ("PNG", "png") if seed % 4 == 0 else ("JPEG", "jpg")
                name = f"{label}_{split}_{i:03d}.{ext}"
                rel = f"{split}/{label}/{name}" if layout == "imagenet" else f"{label}/{name}"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                data = image_bytes(seed, fmt, (20 + seed % 7, 16 + seed % 5))
                path.write_bytes(data)
                files[rel] = data
    return files


def read_shards(out: Path) -> dict[str, dict]:
    """Every sample of every shard in meta.json, read with webdataset AND tarfile.

    Returns {key: {"split", "shard", "ext", "image", "label", "info"}}; asserts that the two
    readers see the same samples and that no key appears twice.
    """
    meta = read_meta(out)
    by_wds: dict[str, dict] = {}
    by_tar: dict[str, dict] = {}
    for split, info in meta["splits"].items():
        for shard in info["shards"]:
            path = out / shard["name"]
            for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                key = sample["__key__"]
                assert key not in by_wds, f"{key} appears twice"
                (ext,) = [k for k in sample if k not in ("__key__", "__url__", "cls", "json",
                                                          "crc32", "__local_path__")]
                sums = json.loads(sample["crc32"])  # format 2: each member's CRC32, checked
                assert sums == {e: f"{zlib.crc32(sample[e]):08x}" for e in (ext, "cls", "json")}
                by_wds[key] = {"split": split, "shard": shard["name"], "ext": ext,
                               "image": sample[ext], "label": decode_label(sample["cls"]),
                               "info": json.loads(sample["json"])}
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    data = tar.extractfile(member).read()
                    entry = by_tar.setdefault(key, {"split": split, "shard": shard["name"]})
                    assert entry["shard"] == shard["name"], f"{key} in two shards"
                    if ext == "cls":
                        entry["label"] = decode_label(data)
                    elif ext == "json":
                        entry["info"] = json.loads(data)
                    elif ext == "crc32":
                        continue
                    else:
                        assert "ext" not in entry, f"{key} has two images"
                        entry["ext"], entry["image"] = ext, data
    assert by_tar == by_wds
    return by_wds


def test_every_image_once_with_label_path_and_original_bytes(tmp_path):
    files = make_tree(tmp_path / "src")
    meta = shard_folder(tmp_path / "src", tmp_path / "out", processes=2, progress=False)
    assert meta == read_meta(tmp_path / "out")  # written, validated, and what was returned
    assert meta["vocab"] == list(CLASSES)
    samples = read_shards(tmp_path / "out")
    assert {s["info"]["path"] for s in samples.values()} == set(files)
    for key, sample in samples.items():
        rel = sample["info"]["path"]
        assert key == sample_key(rel)
        assert sample["image"] == files[rel]  # original bytes, untouched
        assert sample["ext"] == rel.rsplit(".", 1)[1]
        label = rel.split("/")[1]
        assert sample["info"]["label"] == label
        assert sample["label"] == meta["vocab"].index(label)
        assert sample["split"] == ("train" if rel.startswith("train/") else "valid")
    assert meta["splits"]["train"]["count"] == 24 and meta["splits"]["valid"]["count"] == 9
    assert meta["skipped"] == []
    assert meta["formats"] == {"jpg": 25, "png": 8}
    assert inspect_folder(tmp_path / "out", write=lambda line: None) == []


def test_small_sets_get_several_shards_each_mixing_classes(tmp_path):
    make_tree(tmp_path / "src", train=20, valid=6)
    meta = shard_folder(tmp_path / "src", tmp_path / "out", processes=1, progress=False)
    samples = read_shards(tmp_path / "out")
    train_shards = meta["splits"]["train"]["shards"]
    assert len(train_shards) >= 2 and len(meta["splits"]["valid"]["shards"]) >= 2
    for shard in train_shards:
        labels = {s["label"] for s in samples.values() if s["shard"] == shard["name"]}
        if shard["count"] >= 6:
            assert len(labels) >= 2, f"{shard['name']} holds one class only"


def test_same_seed_same_shards_whatever_the_worker_count(tmp_path):
    make_tree(tmp_path / "src", train=12, valid=4)
    one = shard_folder(tmp_path / "src", tmp_path / "a", processes=1, progress=False)
    two = shard_folder(tmp_path / "src", tmp_path / "b", processes=2, progress=False)
    other = shard_folder(tmp_path / "src", tmp_path / "c", processes=2, seed=1, progress=False)
    assert one["splits"] == two["splits"]
    assert one["stats"] == two["stats"]
    assert other["splits"] != one["splits"]  # another seed, another order
    assert other["splits"]["train"]["count"] == one["splits"]["train"]["count"]


def test_a_caller_running_threads_gets_forkserver_workers_and_the_same_shards(tmp_path):
    import threading

    make_tree(tmp_path / "src", train=6, valid=2)
    alone = shard_folder(tmp_path / "src", tmp_path / "a", processes=2, progress=False)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # a thread that might hold a lock at fork
    other.start()
    try:
        assert worker_context().get_start_method() == "forkserver"
        threaded = shard_folder(tmp_path / "src", tmp_path / "b", processes=2, progress=False)
    finally:
        stop.set()
        other.join()
    assert threaded["splits"] == alone["splits"]


def test_flat_tree_split_by_valid_pct(tmp_path):
    files = make_tree(tmp_path / "src", train=15, valid=0, layout="flat")
    meta = shard_folder(tmp_path / "src", tmp_path / "out", valid_pct=0.3, seed=7,
                        progress=False)
    split = random_splitter(0.3, 7, root=tmp_path / "src")
    expected = {rel: split(tmp_path / "src" / rel) for rel in files}
    samples = read_shards(tmp_path / "out")
    assert {s["info"]["path"]: s["split"] for s in samples.values()} == expected
    assert 0 < meta["splits"]["valid"]["count"] < meta["splits"]["train"]["count"]
    assert meta["layout"] == "flat" and meta["vocab"] == list(CLASSES)


def test_stats_are_the_mean_and_std_of_decoded_training_pixels(tmp_path):
    from pipeline.decode import decode_image  # the stream's decoder is the oracle

    files = make_tree(tmp_path / "src", train=5, valid=2)
    meta = shard_folder(tmp_path / "src", tmp_path / "out", progress=False)
    pixels = np.concatenate([
        decode_image(data, rel.rsplit(".", 1)[1]).reshape(-1, 3) / 255.0
        for rel, data in files.items() if rel.startswith("train/")
    ])
    np.testing.assert_allclose(meta["stats"]["mean"], pixels.mean(0), atol=2e-6)
    np.testing.assert_allclose(meta["stats"]["std"], pixels.std(0), atol=2e-6)
    assert meta["stats"]["images"] == 15


def test_stats_from_a_sample_take_the_first_images_of_every_training_shard(tmp_path):
    from pipeline.decode import decode_image

    make_tree(tmp_path / "src", train=10, valid=2)  # 30 training images
    meta = shard_folder(tmp_path / "src", tmp_path / "out", max_count=7, stats_images=10,
                        progress=False)
    shards = meta["splits"]["train"]["shards"]
    assert [s["count"] for s in shards] == [7, 7, 7, 7, 2]
    shares = [-(-10 * s["count"] // 30) for s in shards]  # ceil: proportional to the shard
    assert shares == [3, 3, 3, 3, 1] and meta["stats"]["images"] == sum(shares) >= 10
    first = []
    for shard, share in zip(shards, shares, strict=True):
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            images = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))]
            first += [(tar.extractfile(m).read(), m.name[-3:]) for m in images[:share]]
    pixels = np.concatenate([decode_image(d, e).reshape(-1, 3) / 255.0 for d, e in first])
    np.testing.assert_allclose(meta["stats"]["mean"], pixels.mean(0), atol=2e-6)
    np.testing.assert_allclose(meta["stats"]["std"], pixels.std(0), atol=2e-6)


def test_max_count_and_shard_size_cap_each_shard(tmp_path):
    make_tree(tmp_path / "src", train=10, valid=3)
    meta = shard_folder(tmp_path / "src", tmp_path / "a", max_count=4, progress=False)
    counts = [s["count"] for s in meta["splits"]["train"]["shards"]]
    assert max(counts) == 4 and sum(counts) == 30
    meta = shard_folder(tmp_path / "src", tmp_path / "b", shard_size=6000, progress=False)
    shards = meta["splits"]["train"]["shards"]
    assert all(s["bytes"] <= 6000 or s["count"] == 1 for s in shards)
    assert len(shards) > 5


def test_planned_shard_sizes_are_the_written_sizes_in_copy_mode(tmp_path):
    from shards.shard_plan import _estimated_sample_size, assign_shards, plan, tar_bytes

    make_tree(tmp_path / "src", train=12, valid=3)
    meta = shard_folder(tmp_path / "src", tmp_path / "out", shard_size=40_000, progress=False)
    data, _ = folder_data(tmp_path / "src")
    tasks = assign_shards("train", plan(data).jobs["train"], 40_000, None)
    planned = [tar_bytes(sum(_estimated_sample_size(job) for job in t.jobs)) for t in tasks]
    written = [s["bytes"] for s in meta["splits"]["train"]["shards"]]
    assert written == planned and max(written) <= 40_000 and len(written) > 1


def test_max_size_shrinks_big_images_and_keeps_small_ones(tmp_path):
    src = tmp_path / "src"
    big_jpg, big_png = image_bytes(1, "JPEG", (90, 60)), image_bytes(2, "PNG", (40, 70))
    small = image_bytes(3, "JPEG", (30, 20))
    for rel, data in (("train/a/big.jpg", big_jpg), ("train/a/small.jpg", small),
                      ("train/b/big.png", big_png), ("val/a/v.jpg", small)):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    meta = shard_folder(src, tmp_path / "out", max_size=32, progress=False)
    samples = {s["info"]["path"]: s for s in read_shards(tmp_path / "out").values()}
    sizes = {rel: Image.open(io.BytesIO(s["image"])).size for rel, s in samples.items()}
    assert sizes["train/a/big.jpg"] == (48, 32) and samples["train/a/big.jpg"]["ext"] == "jpg"
    assert sizes["train/b/big.png"] == (32, 56) and samples["train/b/big.png"]["ext"] == "png"
    assert samples["train/a/small.jpg"]["image"] == small  # already small: bytes kept
    assert meta["reencoded"] == 2


def test_refuses_a_non_empty_out_and_force_replaces_only_its_own_files(tmp_path):
    make_tree(tmp_path / "src", train=4, valid=2)
    out = tmp_path / "out"
    shard_folder(tmp_path / "src", out, progress=False)
    with pytest.raises(ShardError, match="not empty.*--force"):
        shard_folder(tmp_path / "src", out, progress=False)
    # leftovers of an interrupted run, an old shard numbered past this run's, a user file
    (out / ".train-000003.tar.999.partial").write_bytes(b"half")
    (out / "train-000042.tar").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    meta = shard_folder(tmp_path / "src", out, force=True, progress=False)
    names = {s["name"] for info in meta["splits"].values() for s in info["shards"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(names | {"meta.json", "notes.txt"})


def test_cli_shards_then_inspects(tmp_path, capsys):
    make_tree(tmp_path / "src", train=4, valid=2)
    out = tmp_path / "out"
    assert cli_main(["shard", str(tmp_path / "src"), str(out), "--processes", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train: 12 images in" in printed and "valid: 6 images in" in printed
    assert "images/s" in printed and "skipped 0 files" in printed
    assert cli_main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vocab: 3 labels" in printed and "cat, dog, fish" in printed
    assert "sizes, sha256, counts and members match" in printed
    assert cli_main(["shard", str(tmp_path / "src"), str(out)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_validation_label_missing_from_train_stops_before_writing(tmp_path):
    make_tree(tmp_path / "src", train=2, valid=1)
    (tmp_path / "src/val/eel").mkdir()
    (tmp_path / "src/val/eel/x.jpg").write_bytes(image_bytes(1))
    with pytest.raises(ShardError, match=r"validation label 'eel' \(e\.g\. val/eel/x\.jpg\)"):
        shard_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_layout_mistakes_are_named(tmp_path):
    make_tree(tmp_path / "flat", train=2, valid=0, layout="flat")
    with pytest.raises(ShardError, match="no train/ folder.*--valid-pct"):
        shard_folder(tmp_path / "flat", tmp_path / "out", progress=False)
    make_tree(tmp_path / "imagenet", train=2, valid=1)
    with pytest.raises(ShardError, match="drop --valid-pct"):
        shard_folder(tmp_path / "imagenet", tmp_path / "out", valid_pct=0.2, progress=False)
    with pytest.raises(ShardError, match="inside SRC"):
        shard_folder(tmp_path / "imagenet", tmp_path / "imagenet/shards", progress=False)
    with pytest.raises(ShardError, match="--valid-pct must be between 0 and 1"):
        shard_folder(tmp_path / "flat", tmp_path / "out", valid_pct=20, progress=False)
