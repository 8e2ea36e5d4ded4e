"""`tench fit` end to end: the run folder's files, predict, vocab refusal, NaN stop that keeps
the last good checkpoint. (kill -9 then --resume, bit-identical: tests/test_midepoch_resume.py.)

Real shards (the sample set), real Ray actors, real training processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shards.sample import make_sample
from shards.sharder import shard_folder
from trainer import cli
from trainer.build import close_streams, make_learner, make_streams, run_callbacks
from trainer.callbacks import CheckpointError, NonFiniteLossError, ParamScheduler, load_checkpoint
from trainer.config import FitConfig
from trainer.fit import run_fit
from trainer.schedules import combine_scheds, sched_no

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
# Small batches: enough of them per epoch that the kill lands inside an epoch.
FIT_ARGS = ["--arch", "cnn", "--epochs", str(EPOCHS), "--batch-size", "4", "--size", "32",
            "--actors", "1", "--seed", "3", "--opt", "adam", "--lr", "3e-3"]
RUN_FILES = {"config.json", "metrics.json", "metrics.csv", "last.pt", "model.pt", "loss.png",
             "schedule.png"}


def tench(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    make_sample(root / "images", per_class=6, valid_per_class=2, seed=0)
    shard_folder(root / "images", root / "shards", processes=1, progress=False)
    return root


@pytest.fixture(scope="module")
def full_run(data):
    """One uninterrupted `tench fit` process (the reference for the resume test)."""
    run = data / "full"
    code, out, err = finish(tench("fit", str(data / "shards"), "--out", str(run), *FIT_ARGS))
    assert code == 0, err
    return run, out


def test_fit_writes_the_run_folder(data, full_run):
    run, out = full_run
    assert {p.name for p in run.iterdir()} >= RUN_FILES
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temp files left
    config = FitConfig.from_json((run / "config.json").read_text())
    assert (config.arch, config.epochs, config.batch_size, config.size, config.seed, config.lr) == (
        "cnn", EPOCHS, 4, 32, 3, 3e-3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == list(range(EPOCHS))
    for row in metrics:
        assert {"epoch", "train_loss", "valid_loss", "accuracy", "seconds"} <= set(row)
        assert 0 <= row["accuracy"] <= 1 and row["train_loss"] > 0 and row["seconds"] > 0
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # it learns something
    assert "valid_loss" in out and "done: 6 epochs" in out  # the table and the summary

    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == EPOCHS - 1 and last["config"] == config.to_dict()
    model = torch.load(run / "model.pt", weights_only=True)
    assert {"arch", "n_classes", "state_dict", "vocab", "vocab_fingerprint", "stats", "size",
            "format_version"} <= set(model)
    meta = json.loads((data / "shards" / "meta.json").read_text())
    assert model["vocab"] == meta["vocab"] and model["vocab_fingerprint"] == last[
        "vocab_fingerprint"] == meta["vocab_fingerprint"]
    assert model["stats"] == {"mean": meta["stats"]["mean"], "std": meta["stats"]["std"]}
    assert state_equal(model["state_dict"], last["model"])


def test_predict_prints_a_class_and_probability_per_image(data, full_run):
    run, _ = full_run
    images = sorted((data / "images" / "val").glob("*/*"))[:3]
    code, out, err = finish(tench("predict", str(run), *map(str, images)))
    assert code == 0, err
    vocab = json.loads((data / "shards" / "meta.json").read_text())["vocab"]
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for line, image in zip(lines, images, strict=True):
        path, label, prob = line.split("\t")
        assert path == str(image) and label in vocab and 0 <= float(prob) <= 1

    bad = data / "not_an_image.jpg"
    bad.write_bytes(b"not a jpeg")
    code, out, err = finish(tench("predict", str(run), str(images[0]), str(bad)))
    assert code == 1 and str(bad) in err and "not a usable image" in err
    assert out.startswith(str(images[0]))  # the good one is still predicted


def test_fit_refuses_a_non_empty_run_folder(data, full_run, capsys):
    run, _ = full_run
    before = (run / "last.pt").read_bytes()
    code = cli.main(["fit", str(data / "shards"), "--out", str(run), *FIT_ARGS])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == before


def test_resume_refuses_a_checkpoint_from_other_shards(data, full_run, capsys):
    other = data / "other_images"
    shutil.copytree(data / "images", other)
    for split in ("train", "val"):
        shutil.rmtree(other / split / "star")  # nine classes: another vocab
    shard_folder(other, data / "other_shards", processes=1, progress=False)
    run = data / "copied_run"
    shutil.copytree(full_run[0], run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    config = FitConfig(shards=str(data / "other_shards"), out=str(run), resume=True)
    with pytest.raises(CheckpointError, match="different label vocab"):
        run_fit(config)
    code = cli.main(["fit", str(data / "other_shards"), "--out", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "different label vocab" in err and "last.pt" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_a_diverging_lr_stops_the_cli_with_a_clear_message(data, ray_local, capsys):
    run = data / "diverged"
    code = cli.main(["fit", str(data / "shards"), "--out", str(run), *FIT_ARGS[:-4],
                     "--opt", "sgd", "--lr", "1e6"])
    err = capsys.readouterr().err
    assert code == 1 and "training diverged" in err and "lower learning rate" in err
    assert not (run / "model.pt").exists()


def test_nan_mid_run_keeps_the_last_good_checkpoint(data, ray_local):
    """Epoch 0 trains at a sane lr, then the lr jumps to 1e6 and the loss turns NaN."""
    run = data / "nan_run"
    config = FitConfig(shards=str(data / "shards"), out=str(run), epochs=3, batch_size=16,
                       size=32, actors=1, opt="sgd", lr=1e-2,
                       arch="cnn", lsuv=False)
    streams = make_streams(config)
    try:
        learn = make_learner(config, streams, run, is_main=False)
        learn.add_cbs(run_callbacks(config, run, streams.train.vocab))
        jump = combine_scheds([1 / 3, 2 / 3], [sched_no(1e-2), sched_no(1e6)])
        with pytest.raises(NonFiniteLossError, match="at epoch 1"):
            learn.fit(3, cbs=[ParamScheduler({"lr": jump})])
    finally:
        close_streams(streams)
    ckpt = load_checkpoint(run / "last.pt", streams.train.vocab.fingerprint)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [0]


def test_a_last_training_batch_of_one_is_dropped_not_a_batchnorm_crash(data, ray_local):
    """60 training images at bs 59 would end each epoch on one sample, which BatchNorm refuses."""
    config = FitConfig(shards=str(data / "shards"), out=str(data / "bs59"), epochs=1,
                       batch_size=59, size=32, actors=1, opt="adam", lr=1e-3,
                       arch="cnn", lsuv=False)
    streams = make_streams(config)
    try:
        assert streams.train.num_samples == 60 and len(streams.train) == 1
        assert [len(b) for b in streams.valid] == [20]  # validation keeps every sample
        learn = make_learner(config, streams, None, is_main=False)
        learn.fit(1)  # raised "Expected more than 1 value per channel" before
        assert len(learn.history) == 1
    finally:
        close_streams(streams)
