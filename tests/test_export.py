"""`tench export`: a torch.export program that takes raw uint8 pixels and gives the run's
model's outputs, a JSON beside it, and the README's plain-torch example actually run."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from shards.vocab import Vocab
from tests.trained_run import write_untrained_run
from trainer import cli
from trainer.callbacks.device import Normalize
from trainer.export import EXPORT_FORMAT_VERSION
from trainer.run_dir import load_model

REPO = Path(__file__).resolve().parents[1]
VOCAB = ["cat", "dog", "fish", "tench"]
STATS = {"mean": [0.45, 0.5, 0.55], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(scope="module", params=["cnn", "xresnet18"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    run = write_untrained_run(root / "run", VOCAB, STATS, size=32, arch=request.param)
    assert cli.main(["export", str(run), "--out", str(root / "out" / "model.pt2")]) == 0
    return run, root / "out"


def test_the_program_gives_the_runs_model_outputs_on_a_batch(exported):
    run, out = exported
    program = torch.export.load(str(out / "model.pt2")).module()
    trained = load_model(run)
    gen = torch.Generator().manual_seed(0)
    for batch_size in (7, 1):  # any batch size
        images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            expected = trained.model(Normalize.from_stats(trained.stats)(images))
            got = program(images)
        assert got.shape == (batch_size, len(VOCAB))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_json_carries_vocab_size_and_normalisation(exported):
    _, out = exported
    info = json.loads((out / "model.json").read_text())
    assert info["format_version"] == EXPORT_FORMAT_VERSION and info["program"] == "model.pt2"
    assert info["vocab"] == VOCAB and info["vocab_fingerprint"] == Vocab(VOCAB).fingerprint
    assert (info["size"], info["resize"]) == (32, 36)
    assert (info["mean"], info["std"]) == (STATS["mean"], STATS["std"])


def readme_example() -> str:
    """The README's export example: the python block that calls torch.export.load."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    [block] = [b for b in blocks if "torch.export.load" in b]
    return block


def test_the_readme_example_runs_and_agrees_with_tench_predict(exported, tmp_path,
                                                               monkeypatch, capsys):
    run, out = exported
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    assert "tench" not in code and "trainer" not in code  # plain torch
    for name in ("model.pt2", "model.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    image = torch.randint(0, 256, (60, 80, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    Image.fromarray(image.numpy()).save(tmp_path / "cat.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    label, prob = printed.getvalue().split()
    assert cli.main(["predict", str(run), str(tmp_path / "cat.jpg"), "--device", "cpu"]) == 0
    _, tench_label, tench_prob = capsys.readouterr().out.split("\t")
    assert label == tench_label and float(prob) == pytest.approx(float(tench_prob), abs=0.02)


def test_a_run_without_a_model_is_refused(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "m.pt2")]) == 2
    assert f"{tmp_path / 'model.pt'}: no model there" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "m.json").exists()
