"""The run folder (`trainer.run_dir`) and the config written into it (`trainer.config`):
model.pt round trip and refusals, --force cleanup, metrics files, older runs' field names,
and `tench fit`'s flags for them. No Ray, no shards: real files, real torch models."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

from shards.vocab import Vocab
from trainer.config import FitConfig, FitError
from trainer.distributed import ClusterOptions, cluster_options_from_args
from trainer.fit import add_arguments, config_from_args
from trainer.models import create_model
from trainer.run_dir import (
    MODEL_FORMAT_VERSION,
    ModelFileError,
    load_model,
    prepare_run_dir,
    read_config,
    save_model,
    write_config,
    write_metrics,
)

VOCAB = Vocab(["cat", "dog", "tench"])
STATS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def fit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tench fit")
    add_arguments(parser)
    return parser


def test_save_model_then_load_model_gives_the_same_predictions(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn", len(VOCAB)).eval()
    config = FitConfig(arch="cnn", size=32)
    path = save_model(tmp_path, model, config, VOCAB, STATS)
    assert path == tmp_path / "model.pt"
    trained = load_model(tmp_path)
    assert (trained.arch, trained.vocab, trained.stats, trained.size) == (
        "cnn", ["cat", "dog", "tench"], STATS, 32)
    assert not trained.model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(trained.model(x), model(x), rtol=0, atol=0)


def test_load_model_names_the_file_and_the_reason(tmp_path):
    with pytest.raises(ModelFileError, match="no model there"):
        load_model(tmp_path)
    save_model(tmp_path, create_model("cnn", 3), FitConfig(), VOCAB, STATS)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save({**state, "format_version": MODEL_FORMAT_VERSION + 1}, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match=f"model.pt: model format {MODEL_FORMAT_VERSION + 1}"):
        load_model(tmp_path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="not a tench model file"):
        load_model(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"truncated")
    with pytest.raises(ModelFileError, match="not a readable tench model"):
        load_model(tmp_path)


def test_force_removes_only_the_run_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "last.pt", "model.pt", "loss.png", "notes.txt"):
        (run / name).write_text("x")
    with pytest.raises(FitError, match="not empty"):
        prepare_run_dir(FitConfig(out=str(run)))
    with pytest.raises(FitError, match="no checkpoint to resume from"):
        prepare_run_dir(FitConfig(out=str(tmp_path / "fresh"), resume=True))
    assert prepare_run_dir(FitConfig(out=str(run), force=True)) == run
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_write_metrics_writes_json_and_csv(tmp_path):
    history = [{"epoch": 0, "train_loss": 2.0, "valid_loss": 1.5, "accuracy": 0.5},
               {"epoch": 1, "train_loss": 1.0, "valid_loss": None, "accuracy": None,
                "seconds": 3.0}]
    write_metrics(tmp_path, history)
    assert json.loads((tmp_path / "metrics.json").read_text()) == history
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss", "accuracy", "seconds"]
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[0]["seconds"] == ""


def test_an_older_runs_config_loads_with_the_new_names(tmp_path):
    old = {**FitConfig().to_dict(), "bs": 16, "workers": 3, "mom": 0.9, "one_cycle": True}
    del old["batch_size"], old["actors"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = read_config(tmp_path)
    assert (config.batch_size, config.actors) == (16, 3)
    assert FitConfig.from_dict(old) == config
    with pytest.raises(ValueError, match="one_cycle=false"):
        FitConfig.from_dict({**old, "one_cycle": False})
    with pytest.raises(ValueError, match="both 'bs'"):
        FitConfig.from_dict({**old, "batch_size": 16})
    with pytest.raises(ValueError, match="unknown fit config keys"):
        FitConfig.from_dict({**old, "momentum": 0.9})
    write_config(tmp_path, config)  # written back with the new names only
    assert {"batch_size", "actors"} <= set(json.loads((tmp_path / "config.json").read_text()))
    assert not {"bs", "workers", "mom", "one_cycle"} & set(FitConfig().to_dict())


def test_resume_merges_an_older_config_json_with_the_flags_given(tmp_path):
    old = {**FitConfig(shards="s", out=str(tmp_path), epochs=7).to_dict(), "bs": 8, "workers": 2}
    del old["batch_size"], old["actors"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    args = fit_parser().parse_args(["s", "--out", str(tmp_path), "--resume", "--device", "cpu"])
    config = config_from_args(args)
    assert (config.epochs, config.batch_size, config.actors, config.device, config.resume) == (
        7, 8, 2, "cpu", True)


def test_fit_flags_actors_batch_size_and_placement(capsys):
    parser = fit_parser()
    parser.print_help()
    help_text = capsys.readouterr().out
    assert "--actors" in help_text and "--batch-size" in help_text
    assert "--workers " not in help_text and "--workers\n" not in help_text  # no bare --workers
    args = parser.parse_args(["s", "--out", "r", "--batch-size", "12", "--actors", "2"])
    assert (config_from_args(args).batch_size, config_from_args(args).actors) == (12, 2)
    args = parser.parse_args(["s", "--out", "r", "--bs", "5", "--num-workers", "2",
                              "--placement", "spread"])
    assert config_from_args(args).batch_size == 5
    options = cluster_options_from_args(args)
    assert (options.num_workers, options.placement) == (2, "spread")
    assert cluster_options_from_args(parser.parse_args(
        ["s", "--out", "r", "--num-workers", "1"])).placement == "pack"
    with pytest.raises(SystemExit):  # not taken for --workers-per-node, but refused
        parser.parse_args(["s", "--out", "r", "--workers", "2"])
    assert "--workers is now --actors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["s", "--out", "r", "--placement", "SPREAD"])
    with pytest.raises(ValueError, match="placement must be one of"):
        ClusterOptions(placement="PACK")


def test_a_killed_writers_partial_files_are_removed_at_resume_and_force(tmp_path):
    """Issue #12 item 8: `.last.pt.<pid>.partial` left by a kill does not survive the next
    start; files that are not the run's own stay."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_text("x")
    leftovers = [run / ".last.pt.4242.partial", run / ".metrics.json.17.partial"]
    for path in leftovers:
        path.write_text("half")
    (run / ".notes.txt.1.partial").write_text("not tench's")
    prepare_run_dir(FitConfig(out=str(run), resume=True))
    assert not any(p.exists() for p in leftovers)
    assert (run / "last.pt").exists() and (run / ".notes.txt.1.partial").exists()
