"""The demo's closing sentence is computed from the run's files (issue #17: never typed)."""

from __future__ import annotations

import json

from trainer.demo_summary import predictions_right, summary


def test_the_sentence_comes_from_metrics_config_and_predictions(tmp_path):
    (tmp_path / "run").mkdir()
    rows = [{"epoch": 0, "accuracy": 0.5, "seconds": 10.2},
            {"epoch": 1, "accuracy": 0.93, "seconds": 9.9},
            {"epoch": 2, "accuracy": 0.915, "seconds": 10.1, "accuracy_tta": 0.925}]
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(rows))
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"arch": "xresnet10_half", "size": 64, "size_start": 48}))
    (tmp_path / "predictions.tsv").write_text(
        "demo/images/val/circle/circle_00004.jpg\tcircle\t0.97\n"
        "demo/images/val/ring/ring_00004.jpg\tcircle\t0.55\n")
    assert summary(tmp_path) == (
        "demo: xresnet10_half at 48:64 px, 3 epochs in 30 s (training + validation), validation "
        "accuracy 91.5% (92.5% with TTA), best 93.0% after epoch 2; tench predict: 1 of 2 right, "
        "probabilities 0.55-0.97")


def test_a_prediction_is_right_when_it_names_the_image_folder():
    assert predictions_right(["a/val/star/x.png\tstar\t0.9", "a/val/star/y.png\tring\t0.6"]) \
        == (1, 2, [0.9, 0.6])
