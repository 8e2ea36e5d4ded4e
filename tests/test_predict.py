"""`tench predict`: weights-only model.pt, real image files, clear errors for bad ones."""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from trainer import cli
from trainer.models import create_model
from trainer.predict import load_predictor

VOCAB = ["cat", "dog", "tench"]


def write_model(run_dir, size=32):
    torch.manual_seed(0)
    model = create_model("cnn", len(VOCAB))
    run_dir.mkdir()
    torch.save({"format_version": 1, "arch": "cnn", "n_classes": 3,
                "state_dict": model.state_dict(), "vocab": VOCAB, "vocab_fingerprint": "x",
                "stats": {"mean": [0.5] * 3, "std": [0.25] * 3}, "size": size},
               run_dir / "model.pt")


def test_predict_prints_path_class_probability(tmp_path, capsys):
    write_model(tmp_path / "run")
    good = tmp_path / "a.png"
    Image.new("RGB", (50, 40), (200, 10, 10)).save(good)
    assert cli.main(["predict", str(tmp_path / "run"), str(good)]) == 0
    path, label, prob = capsys.readouterr().out.strip().split("\t")
    assert path == str(good) and label in VOCAB and 0 <= float(prob) <= 1


def test_bad_image_and_missing_model_are_named(tmp_path, capsys):
    write_model(tmp_path / "run")
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"nope")
    assert cli.main(["predict", str(tmp_path / "run"), str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path / "empty"), str(bad)]) == 2
    assert "model.pt" in capsys.readouterr().err


def test_predict_normalises_as_training_did(tmp_path):
    """The shards' mean/std from model.pt, applied as torchvision's normalize would."""
    write_model(tmp_path / "run")
    predictor = load_predictor(tmp_path / "run")
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    expected = predictor.model(TF.normalize(images.float() / 255, [0.5] * 3, [0.25] * 3))
    torch.testing.assert_close(predictor.probabilities(images), expected.softmax(dim=1),
                               rtol=1e-5, atol=1e-6)


def test_a_model_file_of_another_format_is_refused(tmp_path, capsys):
    write_model(tmp_path / "run")
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    torch.save({**state, "format_version": 99}, tmp_path / "run" / "model.pt")
    good = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(good)
    assert cli.main(["predict", str(tmp_path / "run"), str(good)]) == 2
    assert "model format 99" in capsys.readouterr().err
