"""StreamSettings: one frozen value, checked when made, errors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.settings import CALL_BYTES, MAX_BATCHES_PER_CALL, StreamSettings


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", 2.5), ("batch_size", True), ("num_actors", 0),
    ("prefetch", 0), ("batches_per_call", 0), ("shuffle_buffer", -1), ("seed", -1),
    ("seed", "0"), ("max_restarts", -1), ("shuffle", "yes"), ("drop_last", None),
    ("placement", "everywhere"), ("on_error", "ignore"),
])
def test_a_bad_value_is_refused_naming_its_field(field, value):
    with pytest.raises(ValueError, match=rf"StreamSettings: {field} must .*{value!r}"):
        StreamSettings(**{field: value})


def test_the_defaults_and_the_allowed_nones_are_valid():
    settings = StreamSettings()
    assert settings.num_actors is None and settings.batches_per_call is None
    assert settings.shuffle is None and settings.placement == "local"
    StreamSettings(shuffle_buffer=0, max_restarts=0, shuffle=False, placement="spread",
                   on_error="skip")


def test_it_is_frozen_and_replace_checks_names_and_values():
    settings = StreamSettings(batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch_size = 9
    assert settings.replace(seed=3) == StreamSettings(batch_size=8, seed=3)
    with pytest.raises(TypeError, match="unknown stream setting.*workers.*batch_size"):
        settings.replace(workers=2)
    with pytest.raises(ValueError, match="prefetch"):
        settings.replace(prefetch=0)


def test_shuffle_defaults_to_the_training_split_only():
    assert StreamSettings().shuffles("train") and not StreamSettings().shuffles("valid")
    assert StreamSettings(shuffle=True).shuffles("valid")
    assert not StreamSettings(shuffle=False).shuffles("train")


def test_batches_per_call_fills_about_call_bytes_unless_set():
    assert StreamSettings(batches_per_call=3).batches_per_call_at(128) == 3
    bytes_per_batch = 64 * 128 * 128 * 3  # 3 MB
    assert StreamSettings().batches_per_call_at(128) == round(CALL_BYTES / bytes_per_batch) == 4
    assert StreamSettings(batch_size=4).batches_per_call_at(32) == MAX_BATCHES_PER_CALL
    assert StreamSettings(batch_size=512).batches_per_call_at(256) == 1
