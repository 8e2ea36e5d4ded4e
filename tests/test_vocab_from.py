"""`tench shard --vocab-from OTHER`: separately sharded sets that share one vocab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.format import read_meta
from shards.sharder import ShardError, shard_folder
from shards.vocab import Vocab, read_vocab
from tests.shard_fixtures import serve_http
from tests.test_sharder import make_tree, read_shards
from trainer.cli import main as cli_main


@pytest.fixture()
def other(tmp_path) -> Path:
    """A shards folder of cat, dog, fish and zebra: more classes than the new set has."""
    make_tree(tmp_path / "src_other", train=2, valid=1, classes=("cat", "dog", "fish", "zebra"))
    shard_folder(tmp_path / "src_other", tmp_path / "other", processes=1, progress=False)
    return tmp_path / "other"


def test_labels_get_the_other_sets_indices(tmp_path, other):
    make_tree(tmp_path / "src", train=3, valid=1, classes=("dog", "zebra"))
    meta = shard_folder(tmp_path / "src", tmp_path / "out", processes=1, progress=False,
                        vocab_from=other)
    assert meta["vocab"] == ["cat", "dog", "fish", "zebra"]  # not the learnt ["dog", "zebra"]
    assert meta["vocab_fingerprint"] == read_meta(other)["vocab_fingerprint"]
    assert meta["options"]["vocab_from"] == str(other)
    for sample in read_shards(tmp_path / "out").values():
        assert meta["vocab"][sample["label"]] == sample["info"]["label"]
    plain = shard_folder(tmp_path / "src", tmp_path / "plain", processes=1, progress=False)
    assert plain["vocab"] == ["dog", "zebra"]  # without the flag: learnt as before


def test_a_label_the_other_lacks_is_an_error_naming_it_and_a_file(tmp_path, other):
    make_tree(tmp_path / "src", train=2, valid=1, classes=("cat", "horse"))
    with pytest.raises(ShardError, match="'horse'") as e:
        shard_folder(tmp_path / "src", tmp_path / "out", processes=1, progress=False,
                     vocab_from=other)
    assert "horse_train_000" in str(e.value) or "horse_val_000" in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_vocab_from_a_json_file_a_url_and_bad_inputs(tmp_path, other):
    Vocab(["a", "b"]).save(tmp_path / "vocab.json")
    assert read_vocab(tmp_path / "vocab.json").names == ["a", "b"]
    with serve_http(other) as url:
        assert read_vocab(url) == Vocab(read_meta(other)["vocab"])
    (tmp_path / "bad.json").write_text(json.dumps({"names": []}))
    with pytest.raises(ValueError, match="bad.json: no 'vocab'"):
        read_vocab(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not found"):
        read_vocab(tmp_path / "nowhere")


def test_cli_flag(tmp_path, other, capsys):
    make_tree(tmp_path / "src", train=2, valid=1, classes=("cat",))
    assert cli_main(["shard", str(tmp_path / "src"), str(tmp_path / "out"),
                     "--vocab-from", str(other)]) == 0
    assert read_meta(tmp_path / "out")["vocab"] == ["cat", "dog", "fish", "zebra"]
    assert cli_main(["shard", str(tmp_path / "src"), str(tmp_path / "out2"),
                     "--vocab-from", str(tmp_path / "missing")]) == 1
    assert "--vocab-from" in capsys.readouterr().err
