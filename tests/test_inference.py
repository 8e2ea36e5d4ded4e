"""`tench predict` over shards and image files: a real 2-epoch run on real shards, real Ray.

The CSV holds every validation sample exactly once, and its accuracy is the run's own final
validation accuracy; --top-k, --tta, folders of images, and bad input (no model, another
vocab, a file that is not an image, an endless file).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.source import ShardSource
from shards.vocab import Vocab
from tests.shard_fixtures import CLASSES, make_shards
from tests.trained_run import train_tiny_run
from trainer import cli
from trainer.inference import (
    InferenceError,
    load_predictor,
    read_image_bytes,
    split_stream,
)
from trainer.predict import csv_columns


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_local):
    return train_tiny_run(tmp_path_factory.mktemp("inference"))


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def predict_csv(tiny, out: Path, *extra: str) -> list[dict]:
    code = cli.main(["predict", str(tiny.run), "--shards", str(tiny.shards), "--out", str(out),
                     "--batch-size", "5", "--actors", "2", *extra])
    assert code == 0
    return read_csv(out)[1]


@pytest.fixture(scope="module")
def top5(tiny):
    """One `tench predict --shards --top-k 5` of the validation split (3 classes) and its
    stdout; the tests below read it."""
    out = tiny.run.parent / "top5.csv"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        rows = predict_csv(tiny, out, "--top-k", "5")
    return out, rows, capture.getvalue()


def test_csv_has_every_sample_once_and_the_runs_validation_accuracy(tiny, top5):
    _, rows, printed = top5
    meta = json.loads((tiny.shards / "meta.json").read_text())
    valid_keys = set(tiny.labels["valid"])
    assert len(rows) == meta["splits"]["valid"]["count"] == 23
    assert [r["key"] for r in rows] and {r["key"] for r in rows} == valid_keys
    assert len({r["key"] for r in rows}) == len(rows)  # exactly once
    for r in rows:  # the path is the sample's, the label its folder, both names from the vocab
        assert r["path"].startswith(f"valid/{r['label']}/")
        assert r["label"] == CLASSES[tiny.labels["valid"][r["key"]]]
        assert r["label"] in CLASSES and r["prediction"] in CLASSES
        assert 1 / len(CLASSES) <= float(r["probability"]) <= 1
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    final = json.loads((tiny.run / "metrics.json").read_text())[-1]["accuracy"]
    assert accuracy == pytest.approx(final, abs=1e-6)
    assert len({r["prediction"] for r in rows}) > 1  # not a constant model: the check can fail
    assert f"accuracy {accuracy:.2%}" in printed


def test_top_k_columns(top5):
    path, rows, _ = top5
    assert read_csv(path)[0] == csv_columns(5) == [
        "key", "path", "label", "prediction", "probability", "top1", "top1_probability",
        "top2", "top2_probability", "top3", "top3_probability", "top4", "top4_probability",
        "top5", "top5_probability"]
    for r in rows:
        probs = [float(r[f"top{i}_probability"]) for i in (1, 2, 3)]
        assert r["top1"] == r["prediction"] and probs[0] == float(r["probability"])
        assert probs == sorted(probs, reverse=True)
        assert {r["top1"], r["top2"], r["top3"]} == set(CLASSES)
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert r["top4"] == r["top5_probability"] == ""  # K above the number of classes


def test_tta_averages_the_crop_and_its_flip(tiny, top5, tmp_path):
    plain = load_predictor(tiny.run, "cpu")
    tta = load_predictor(tiny.run, "cpu", tta=True)
    source = ShardSource.of(tiny.shards)
    with split_stream(plain, source, "valid", batch_size=8, actors=1) as stream:
        images = next(iter(stream)).images
    expected = (plain.probabilities(images) + plain.probabilities(images.flip(3))) / 2
    torch.testing.assert_close(tta.probabilities(images), expected)
    assert not torch.allclose(expected, plain.probabilities(images))  # flipping matters here

    rows = {r["key"]: r for r in predict_csv(tiny, tmp_path / "tta.csv", "--tta")}
    base = {r["key"]: r for r in top5[1]}
    assert rows.keys() == base.keys()
    assert any(rows[k]["probability"] != base[k]["probability"] for k in rows)


def test_folders_of_images_and_a_file_that_is_not_an_image(tiny, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (50, 40), (200, 10, 10)).save(folder / "a.png")
    Image.new("RGB", (30, 60), (10, 200, 10)).save(folder / "sub" / "b.jpg")
    bad = folder / "c.jpg"
    bad.write_bytes(b"not a jpeg at all")
    code = cli.main(["predict", str(tiny.run), str(folder)])
    captured = capsys.readouterr()
    assert code == 1
    lines = [line.split("\t") for line in captured.out.strip().splitlines()]
    assert [line[0] for line in lines] == [str(folder / "a.png"), str(folder / "sub" / "b.jpg")]
    assert all(line[1] in CLASSES for line in lines)
    assert f"{bad}: not a usable image" in captured.err
    assert "1 of 3 images could not be read" in captured.err

    # the same as CSV, and image files mixed with folders
    code = cli.main(["predict", str(tiny.run), str(folder / "a.png"), str(folder / "sub"),
                     "--out", str(tmp_path / "files.csv"), "--top-k", "2"])
    assert code == 0
    header, rows = read_csv(tmp_path / "files.csv")
    assert header == csv_columns(2)
    assert [r["path"] for r in rows] == [str(folder / "a.png"), str(folder / "sub" / "b.jpg")]
    assert [r["prediction"] for r in rows] == [line[1] for line in lines]


def test_an_endless_file_is_capped_and_the_others_still_predicted(tiny, tmp_path, capsys):
    good = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (0, 0, 200)).save(good)
    code = cli.main(["predict", str(tiny.run), "/dev/zero", str(good)])
    captured = capsys.readouterr()
    assert code == 1
    assert "/dev/zero: larger than 64 MB, the most tench reads per image" in captured.err
    assert captured.out.startswith(f"{good}\t")

    big = tmp_path / "big.jpg"
    big.write_bytes(bytes(2000))
    with pytest.raises(InferenceError, match=r"big\.jpg: larger than"):
        read_image_bytes(big, limit=1000)
    assert read_image_bytes(big, limit=2000) == bytes(2000)


def test_no_model_and_another_vocab_are_refused(tiny, tmp_path, capsys):
    good = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(good)
    for args in (["predict", str(tmp_path / "nothing"), str(good)],
                 ["predict", str(tmp_path / "nothing"), "--shards", str(tiny.shards), "--out",
                  str(tmp_path / "x.csv")]):
        assert cli.main(args) == 2
        assert f"{tmp_path / 'nothing' / 'model.pt'}: no model there" in capsys.readouterr().err

    other = make_shards(tmp_path / "other", {"train": 3, "valid": 3}).folder
    meta = json.loads((other / "meta.json").read_text())
    vocab = Vocab(["ant", "bee", "wasp"])
    (other / "meta.json").write_text(json.dumps({**meta, **vocab.to_json()}))
    out = tmp_path / "refused.csv"
    assert cli.main(["predict", str(tiny.run), "--shards", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert vocab.fingerprint in err and Vocab(CLASSES).fingerprint in err
    assert not out.exists()

    assert cli.main(["predict", str(tiny.run), "--shards", str(tiny.shards), "--split", "test",
                     "--out", str(out)]) == 2
    assert "no split 'test'" in capsys.readouterr().err
    assert cli.main(["predict", str(tiny.run), "--shards", str(tiny.shards)]) == 2
    assert "--out" in capsys.readouterr().err

