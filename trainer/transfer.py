"""`tench fit --init SOURCE`: start a run from an earlier model's weights.

SOURCE is a tench run folder (its model.pt), a tench model.pt, or a PyTorch state-dict file
(`torch.save(model.state_dict(), path)`, e.g. torchvision's ResNet weights) for an
architecture tench builds. Everything is read with `torch.load(weights_only=True)`.

The head (the classifier) is kept only when the source was trained on the same vocab as the
new shards (same labels in the same order: equal fingerprints); otherwise, and always for a
plain state dict (no vocab), the body is loaded and the head stays as the new model drew it.
Weights whose names or shapes do not match are listed, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shards.vocab import Vocab, vocab_fingerprint
from trainer.config import FitError
from trainer.models import head_name
from trainer.run_dir import MODEL_FORMAT_VERSION, MODEL_KEYS, MODEL_NAME

NAMES_SHOWN = 12  # names listed per kind of mismatch; the count is always complete


@dataclass(frozen=True)
class InitSource:
    """The weights of SOURCE, with its arch and vocab when it is a tench model."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    arch: str | None = None  # None: a plain state dict
    vocab: list[str] | None = None


@dataclass
class InitReport:
    """What `load_init` did: which weights it loaded, which it could not, head kept or new."""

    source: InitSource
    loaded: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, src, here
    missing: list[str] = field(default_factory=list)  # in the model, not in the source
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the model
    head_kept: bool = False
    head_reason: str = ""
    model_size: int = 0  # entries of the model's state_dict (weights and buffers)

    def lines(self) -> list[str]:
        """The log of the load, one line per fact, for stdout."""
        src = self.source
        what = f"a tench {src.arch} model, {len(src.vocab)} labels" if src.arch else "state dict"
        lines = [f"init: {len(self.loaded)} of the model's {self.model_size} weights loaded "
                 f"from {src.path} ({what})",
                 f"init: {'head kept' if self.head_kept else 'body kept, new head'}: "
                 f"{self.head_reason}"]
        if self.mismatched:
            shown = [f"{name} ({_shape(a)} in the source, {_shape(b)} here)"
                     for name, a, b in self.mismatched]
            lines.append(f"init: {len(shown)} weights have other shapes, not loaded: "
                         f"{_listed(shown)}")
        if self.missing:
            lines.append(f"init: {len(self.missing)} weights missing from the source, left as "
                         f"initialised: {_listed(self.missing)}")
        if self.unexpected:
            lines.append(f"init: {len(self.unexpected)} weights of the source not in this "
                         f"model, ignored: {_listed(self.unexpected)}")
        return lines


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _listed(names: list[str]) -> str:
    more = len(names) - NAMES_SHOWN
    return ", ".join(names[:NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _tensor_dict(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def read_init_source(source: str | Path) -> InitSource:
    """Read SOURCE (a run folder, a tench model file or a state-dict file) onto the CPU."""
    path = Path(source)
    if path.is_dir():
        path = path / MODEL_NAME
        if not path.is_file():
            raise FitError(f"--init {source}: no {MODEL_NAME} in that folder; is it a "
                           "finished `tench fit` run?")
    if not path.is_file():
        raise FitError(f"--init {source}: no such file or folder")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-object files
        raise FitError(f"--init {path}: not a weights file torch can read with "
                       f"weights_only=True ({e})") from e
    if isinstance(data, dict) and set(data) >= MODEL_KEYS:
        if data["format_version"] != MODEL_FORMAT_VERSION:
            raise FitError(f"--init {path}: tench model format {data['format_version']!r}, "
                           f"this tench reads {MODEL_FORMAT_VERSION}")
        return InitSource(path, dict(data["state_dict"]), str(data["arch"]),
                          list(data["vocab"]))
    if _tensor_dict(data):
        return InitSource(path, dict(data))
    raise FitError(f"--init {path}: neither a tench model nor a state dict (a dict of "
                   "name -> tensor, as torch.save(model.state_dict()) writes)")


def source_arch(source: str | Path) -> str | None:
    """The arch SOURCE was trained as when it is a tench model (the default for --arch)."""
    return read_init_source(source).arch


def load_init(model: nn.Module, source: InitSource, vocab: Vocab, arch: str) -> InitReport:
    """Copy the source's matching weights into `model` (built for `arch` and `vocab`).

    Raises FitError when the source is a tench model of another arch, or when not one of
    its weights fits the model (a file for another architecture).
    """
    if source.arch is not None and source.arch != arch:
        raise FitError(f"--init {source.path} is a {source.arch} model; fit it with --arch "
                       f"{source.arch} (or leave --arch out), not {arch}")
    target = model.state_dict()
    report = InitReport(source, model_size=len(target))
    if source.vocab is None:
        report.head_reason = "the source has no vocab (a plain state dict)"
    elif vocab_fingerprint(source.vocab) == vocab.fingerprint:
        report.head_kept = True
        report.head_reason = f"the shards have the source's vocab ({len(vocab)} labels)"
    else:
        old = vocab_fingerprint(source.vocab)
        report.head_reason = (f"the shards' vocab ({len(vocab)} labels, fingerprint "
                              f"{vocab.fingerprint[:12]}…) differs from the source's ({old[:12]}…"
                              f"; {_vocab_change(source.vocab, vocab.names)})")
    head = head_name(model) + "."
    skip = (lambda name: False) if report.head_kept else (lambda name: name.startswith(head))
    weights = {k: v for k, v in source.state_dict.items() if not skip(k)}
    for name, tensor in target.items():
        if skip(name):
            continue
        if name not in weights:
            report.missing.append(name)
        elif weights[name].shape != tensor.shape:
            report.mismatched.append((name, tuple(weights[name].shape), tuple(tensor.shape)))
        else:
            report.loaded.append(name)
    report.unexpected = [name for name in weights if name not in target]
    if not report.loaded:
        raise FitError(f"--init {source.path}: none of its {len(source.state_dict)} weights "
                       f"fits --arch {arch} (e.g. {_listed(list(source.state_dict)[:3])}); "
                       "is it a state dict of that architecture?")
    model.load_state_dict({name: weights[name] for name in report.loaded}, strict=False)
    return report


def _vocab_change(old: list[str], new: list[str]) -> str:
    """Why two vocabs differ, in words: other labels, another count, or another order."""
    if sorted(old) == sorted(new):
        return "the same labels in another order"
    if len(old) != len(new):
        return f"{len(old)} labels then, {len(new)} now"
    return "other labels"
