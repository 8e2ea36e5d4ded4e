"""shards.vocab: index <-> name, the JSON round trip and the fingerprint that guards it."""

from __future__ import annotations

import hashlib
import json

import pytest

from shards.vocab import UnknownLabelError, Vocab, vocab_fingerprint

NAMES = ["ant", "bee", "zèbre"]


def test_from_labels_is_sorted_unique_whatever_the_order_seen():
    vocab = Vocab.from_labels(["zèbre", "bee", "ant", "bee", "zèbre"])
    assert vocab.names == NAMES and len(vocab) == 3 and list(vocab) == NAMES
    assert Vocab.from_labels(reversed(NAMES)) == vocab


def test_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        Vocab(["a", "b", "a"])


def test_encode_and_decode_are_inverse():
    vocab = Vocab(NAMES)
    assert [vocab.encode(n) for n in NAMES] == [0, 1, 2]
    assert [vocab.decode(i) for i in range(3)] == NAMES
    with pytest.raises(IndexError):
        vocab.decode(3)


def test_unknown_label_names_the_label_the_file_and_the_vocab():
    vocab = Vocab(NAMES)
    with pytest.raises(UnknownLabelError) as err:
        vocab.encode("fox", source="valid/fox/1.jpg")
    message = str(err.value)
    assert message == ("label 'fox' (file valid/fox/1.jpg) is not in the training vocab "
                       "['ant', 'bee', 'zèbre']")  # plain text, not KeyError's quoted repr
    assert isinstance(err.value, KeyError)  # callers catching KeyError still catch it
    with pytest.raises(UnknownLabelError, match=r"^label 'fox' is not in"):
        vocab.encode("fox")


def test_fingerprint_is_sha256_of_the_names_in_order():
    expected = hashlib.sha256('["ant","bee","zèbre"]'.encode()).hexdigest()
    assert vocab_fingerprint(NAMES) == Vocab(NAMES).fingerprint == expected
    # the same names in another order are another vocab: indices would change meaning
    assert Vocab(["bee", "ant", "zèbre"]).fingerprint != expected
    assert Vocab(NAMES + ["other"]).fingerprint != expected


def test_json_round_trip_through_a_file(tmp_path):
    vocab = Vocab(NAMES)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"vocab": NAMES, "vocab_fingerprint": vocab.fingerprint}
    assert "zèbre" in path.read_text(encoding="utf-8")  # readable, not \\u-escaped
    assert Vocab.load(path) == vocab and Vocab.from_json(vocab.to_json()) == vocab
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


def test_from_json_refuses_a_fingerprint_that_disagrees():
    data = Vocab(NAMES).to_json()
    data["vocab"] = ["bee", "ant", "zèbre"]  # swapped by hand
    with pytest.raises(ValueError, match="fingerprint mismatch.*edited by hand"):
        Vocab.from_json(data)
    # without a stored fingerprint there is nothing to check against
    assert Vocab.from_json({"vocab": ["b", "a"]}).names == ["b", "a"]


def test_check_fingerprint_names_what_was_made_with_another_vocab():
    vocab = Vocab(NAMES)
    vocab.check_fingerprint(vocab.fingerprint, "checkpoint x.pt")  # same vocab: no error
    other = Vocab(["cat", "dog"]).fingerprint
    with pytest.raises(ValueError, match=r"checkpoint x\.pt was made with a different label "
                                         r"vocab .* for 3 labels \['ant', 'bee', 'zèbre'\]"):
        vocab.check_fingerprint(other, "checkpoint x.pt")
    many = Vocab([f"c{i}" for i in range(8)])
    with pytest.raises(ValueError, match=r"\['c0', 'c1', 'c2', 'c3', 'c4'\]…"):
        many.check_fingerprint(other, "stream")


def test_equality_is_by_names_in_order():
    assert Vocab(NAMES) == Vocab(list(NAMES))
    assert Vocab(NAMES) != Vocab(reversed(NAMES))
    assert Vocab(NAMES) != NAMES  # a list of the same names is not a Vocab
    assert repr(Vocab(["a"])) == "Vocab(['a'])"
