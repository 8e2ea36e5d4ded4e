"""`tench interpret`: the files it writes, checked against a hand count of `tench predict`'s
CSV for the same run and shards (real shards, real Ray, a seeded untrained model)."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from shards.vocab import Vocab
from tests.shard_fixtures import CLASSES, make_shards
from tests.trained_run import write_untrained_run
from trainer import cli
from trainer.inference import load_predictor, split_stream, stream_probabilities
from trainer.interpret import Interpretation, interpret, most_confused, per_class_csv

K = 4


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory, ray_local):
    """Shards, a run of their vocab, `tench interpret` output and `tench predict`'s CSV."""
    root = tmp_path_factory.mktemp("interpret")
    shards = make_shards(root / "shards", {"train": 6, "valid": 17}, image_size=(44, 38),
                         seed=2)
    run = write_untrained_run(root / "run", list(CLASSES), shards.meta["stats"], seed=1)
    common = ["--shards", str(shards.folder), "--batch-size", "5", "--actors", "2"]
    assert cli.main(["predict", str(run), *common, "--out", str(root / "preds.csv"),
                     "--top-k", str(len(CLASSES))]) == 0
    with open(root / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return root, run, shards, rows, common


def test_interpret_writes_its_files_and_prints_the_most_confused(interpreted, capsys):
    root, run, _, rows, common = interpreted
    capsys.readouterr()
    assert cli.main(["interpret", str(run), *common, "--out", str(root / "out"),
                     "--top-losses", str(K)]) == 0
    printed = capsys.readouterr().out
    out = root / "out"
    assert {p.name for p in out.iterdir()} == {"confusion.png", "top_losses.png", "per_class.csv"}
    for name in ("confusion.png", "top_losses.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) >= 300

    # per_class.csv against a hand count of the predictions
    with open(out / "per_class.csv", newline="") as f:
        per_class = {r["class"]: r for r in csv.DictReader(f)}
    assert list(per_class) == list(CLASSES)
    for name in CLASSES:
        count = sum(r["label"] == name for r in rows)
        predicted = sum(r["prediction"] == name for r in rows)
        hits = sum(r["label"] == r["prediction"] == name for r in rows)
        assert int(per_class[name]["count"]) == count
        assert per_class[name]["recall"] == (f"{hits / count:.6f}" if count else "")
        assert per_class[name]["precision"] == (f"{hits / predicted:.6f}" if predicted else "")

    # most_confused against the same hand count
    pairs = Counter((r["label"], r["prediction"]) for r in rows if r["label"] != r["prediction"])
    for (label, prediction), count in pairs.items():
        assert f"  {label} -> {prediction}: {count}\n" in printed
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert f"{len(rows)} valid images, accuracy {accuracy:.2%}" in printed


def test_top_losses_are_the_k_highest_cross_entropies(interpreted):
    _, run, shards, rows, _ = interpreted
    predictor = load_predictor(run, "cpu")
    with split_stream(predictor, shards.folder, "valid", 5, 2) as stream:
        result = interpret(predictor.vocab, stream_probabilities(predictor, stream), K)
    # the loss of each sample from the CSV's probabilities of every class
    losses = {}
    for r in rows:
        probs = {r[f"top{i}"]: float(r[f"top{i}_probability"]) for i in (1, 2, 3)}
        losses[r["key"]] = -math.log(probs[r["label"]])
    worst = sorted(losses, key=losses.get, reverse=True)[:K]
    assert [t.key for t in result.top] == worst
    for t in result.top:
        assert t.loss == pytest.approx(losses[t.key], abs=1e-4)
        assert t.image.shape == (32, 32, 3) and t.image.dtype == np.uint8  # as the model saw it
        row = next(r for r in rows if r["key"] == t.key)
        assert CLASSES[t.label] == row["label"] and CLASSES[t.prediction] == row["prediction"]
        assert t.probability == pytest.approx(float(row["probability"]), abs=1e-5)
    assert len(result.labels) == len(rows) == 17


def test_per_class_and_most_confused_by_hand():
    vocab = ["a", "b", "c"]
    result = Interpretation(vocab, labels=[0, 0, 0, 1, 1, 2], predictions=[0, 1, 1, 1, 0, 0])
    matrix = result.confusion()
    assert matrix.tolist() == [[1, 2, 0], [1, 1, 0], [1, 0, 0]]
    assert most_confused(matrix, vocab) == [("a", "b", 2), ("b", "a", 1), ("c", "a", 1)]
    lines = per_class_csv(matrix, vocab).splitlines()
    assert lines == ["class,precision,recall,count",
                     "a,0.333333,0.333333,3", "b,0.333333,0.500000,2", "c,,0.000000,1"]
    assert result.accuracy == pytest.approx(2 / 6)


def test_bad_input_is_refused_with_its_name(interpreted, tmp_path, capsys):
    _, run, _, _, common = interpreted
    assert cli.main(["interpret", str(tmp_path / "none"), *common, "--out",
                     str(tmp_path / "o")]) == 2
    assert "model.pt: no model there" in capsys.readouterr().err
    other = make_shards(tmp_path / "other", {"train": 3, "valid": 3}).folder
    meta = json.loads((other / "meta.json").read_text())
    vocab = Vocab(["ant", "bee", "wasp"])
    (other / "meta.json").write_text(json.dumps({**meta, **vocab.to_json()}))
    assert cli.main(["interpret", str(run), "--shards", str(other), "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert vocab.fingerprint in err and Vocab(CLASSES).fingerprint in err
    assert not (tmp_path / "o").exists()
