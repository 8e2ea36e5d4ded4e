"""The label vocabulary: index <-> name, saved as JSON with a fingerprint.

The vocab is built from the training split only, sorted so two runs over the same
folders agree, and applied unchanged to validation. Its fingerprint lets a stream or a
checkpoint refuse shards labelled with a different vocab.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from shards.remote import is_url, join, open_file


def vocab_fingerprint(names: Sequence[str]) -> str:
    """sha256 of the names in index order, as canonical JSON."""
    data = json.dumps(list(names), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()  # bytes names too


class UnknownLabelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class Vocab:
    """An ordered list of label names; `encode(name) -> index`, `decode(index) -> name`."""

    def __init__(self, names: Iterable[str]):
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError("vocab names must be unique")

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> Vocab:
        """Sorted unique labels, so the same folders always give the same vocab."""
        return cls(sorted(set(labels)))

    @property
    def fingerprint(self) -> str:
        return vocab_fingerprint(self.names)

    def encode(self, name: str, source: str | None = None) -> int:
        try:
            return self.index[name]
        except KeyError:
            where = f" (file {source})" if source else ""
            raise UnknownLabelError(
                f"label {name!r}{where} is not in the training vocab {self.names}"
            ) from None

    def decode(self, index: int) -> str:
        return self.names[index]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.names == self.names

    def __repr__(self) -> str:
        return f"Vocab({self.names!r})"

    def to_json(self) -> dict:
        return {"vocab": self.names, "vocab_fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, data: dict) -> Vocab:
        """Load from `{"vocab", "vocab_fingerprint"}`, refusing a fingerprint that disagrees."""
        vocab = cls(data["vocab"])
        expected = data.get("vocab_fingerprint")
        if expected is not None and expected != vocab.fingerprint:
            raise ValueError(
                f"vocab fingerprint mismatch: stored {expected[:12]}…, computed "
                f"{vocab.fingerprint[:12]}…; the vocab was edited by hand or is corrupt"
            )
        return vocab

    def save(self, path: str | Path) -> None:
        from shards.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def check_fingerprint(self, fingerprint: str, what: str) -> None:
        """Raise a clear error when `what` (a checkpoint, a stream) was made with another vocab."""
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"{what} was made with a different label vocab (fingerprint "
                f"{fingerprint[:12]}… vs {self.fingerprint[:12]}… for {len(self)} labels "
                f"{self.names[:5]}{'…' if len(self) > 5 else ''}); use shards and checkpoints "
                "made from the same `tench shard` run"
            )


def read_vocab(location: str | Path) -> Vocab:
    """The vocab of a shards folder or URL (its `meta.json`) or of a vocab JSON file.

    `tench shard --vocab-from`: so separately sharded sets share one vocab (and can be
    streamed together). Raises ValueError naming the file and the reason.
    """
    text = str(location).rstrip("/")
    if text.endswith(".json"):
        where, name = text.rsplit("/", 1) if is_url(text) else (Path(text).parent, Path(text).name)
    else:
        where, name = text, "meta.json"
    shown = join(where, name)
    try:
        with open_file(where, name) as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{shown}: not found (give a shards folder or URL, or a vocab JSON)"
                         ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{shown}: not readable as JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("vocab"), list):
        raise ValueError(f"{shown}: no 'vocab' list in it (give a shards folder or URL, or a "
                         "vocab JSON)")
    try:
        return Vocab.from_json(data)
    except ValueError as e:
        raise ValueError(f"{shown}: {e}") from None
