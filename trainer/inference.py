"""Batched predictions of a trained run, shared by `tench predict` and `tench interpret`.

Two inputs, one model path: a split of a shards folder, streamed through `ShardStream`'s
Ray actors with the validation transforms (exactly what the run's validation pass saw),
or image files, decoded here the same way. Batches stay uint8 until they reach the run's
device, where `Normalize` (the one normalisation) turns them into floats, as in training.
`tta=True` averages the probabilities of the centre crop and its horizontal flip.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.decode import DecodeError, decode_image
from pipeline.plan import shard_entries
from pipeline.source import ShardSource
from pipeline.stream import ShardStream
from pipeline.tarstream import iter_tar
from pipeline.transforms import valid_tfms
from shards.files import get_files, image_extensions
from shards.format import INFO_EXT
from shards.vocab import Vocab
from trainer.callbacks.device import Normalize, default_device
from trainer.run_dir import load_model

# Read at most this much of one image file: `/dev/zero` or a 40 GB file named `.jpg` must
# fail on its own, not exhaust memory. Real photos are far below it.
MAX_IMAGE_BYTES = 64 << 20


class InferenceError(ValueError):
    """An input that cannot be predicted (a file, shards of another vocab); it is named."""


@dataclass
class Predictor:
    """A trained model on its device, with what it needs to see images as in training."""

    model: torch.nn.Module  # eval mode, on `device`, channels-last like in training
    vocab: list[str]
    normalize: Normalize  # the shards' mean/std, as in training
    size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    vocab_fingerprint: str = ""
    tta: bool = False  # also predict the flipped image and average

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, n_classes) float32 softmax probabilities, on `device`.

        On CUDA the forward pass runs under bf16 autocast, as the run's validation did.
        """
        cuda = self.device.type == "cuda"
        if cuda and not images.is_pinned():
            images = images.pin_memory()
        x = self.normalize(images.to(self.device, non_blocking=cuda,
                                     memory_format=torch.channels_last))
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            probs = self.model(x).float().softmax(dim=1)
            if self.tta:
                probs = (probs + self.model(x.flip(3)).float().softmax(dim=1)) / 2
        return probs

    def image_tensor(self, path: str | Path) -> torch.Tensor:
        """(3, size, size) uint8 from an image file, as the validation stream delivers it."""
        path = Path(path)
        data = read_image_bytes(path)
        chain = valid_tfms(self.size)
        try:
            image = decode_image(data, path.suffix.lstrip(".").lower(),
                                 target_size=chain.decode_size, source=str(path))
            image = chain(image, np.random.default_rng(0))  # the chain draws nothing
        except (DecodeError, ValueError) as e:
            raise InferenceError(f"{path}: not a usable image ({e})") from e
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def load_predictor(run_dir: str | Path, device: str | torch.device | None = None,
                   tta: bool = False) -> Predictor:
    """The run's model.pt on `device` (default: CUDA when present); raises ModelFileError."""
    trained = load_model(run_dir)
    device = torch.device(device) if device is not None else default_device()
    model = trained.model.to(device, memory_format=torch.channels_last).eval()
    return Predictor(model, trained.vocab, Normalize.from_stats(trained.stats).to(device),
                     trained.size, device, Vocab(trained.vocab).fingerprint, tta)


# ----------------------------------------------------------------------------- image files
def read_image_bytes(path: Path, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The file's bytes, refusing (not reading on) past `limit`."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InferenceError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(data) > limit:
        raise InferenceError(f"{path}: larger than {limit >> 20} MB, the most tench reads per "
                             "image; not an image it can predict")
    return data


def expand_image_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders replaced by the image files under them (sorted)."""
    out: list[Path] = []
    for path in paths:
        out += get_files(path, image_extensions) if Path(path).is_dir() else [Path(path)]
    return out


@dataclass(frozen=True)
class FileResult:
    path: Path
    probs: torch.Tensor | None  # (n_classes,) on the CPU, None when the file failed
    error: str = ""


def predict_files(predictor: Predictor, paths: Iterable[Path], batch_size: int = 64
                  ) -> Iterator[FileResult]:
    """One result per file, in order: predicted in batches, a bad file reported on its own."""
    pending: list[tuple[Path, torch.Tensor | None, str]] = []

    def flush() -> Iterator[FileResult]:
        good = [image for _, image, _ in pending if image is not None]
        probs = iter(predictor.probabilities(torch.stack(good)).cpu()) if good else iter(())
        for path, image, error in pending:
            yield FileResult(path, None if image is None else next(probs), error)
        pending.clear()

    for path in paths:
        try:
            pending.append((path, predictor.image_tensor(path), ""))
        except InferenceError as e:
            pending.append((path, None, str(e)))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


# ----------------------------------------------------------------------------- shards
def check_vocab(predictor: Predictor, source: ShardSource, run_dir: str | Path) -> dict:
    """`meta.json` of `source`, refused when its vocab is not the run's (both named)."""
    meta = source.read_meta()
    if meta["vocab_fingerprint"] != predictor.vocab_fingerprint:
        raise InferenceError(
            f"{source.url_of('meta.json')} has vocab fingerprint {meta['vocab_fingerprint']} "
            f"({len(meta['vocab'])} labels) but the run {run_dir} was trained with "
            f"{predictor.vocab_fingerprint} ({len(predictor.vocab)} labels); predict with "
            "shards made by the same `tench shard` run")
    return meta


def split_stream(predictor: Predictor, source: ShardSource, split: str, batch_size: int = 64,
                 actors: int | None = None, address: str | None = None) -> ShardStream:
    """The split in its written order, with the validation transforms at the run's size."""
    return ShardStream(source, split, batch_size=batch_size, shuffle=False,
                       item_tfms=valid_tfms(predictor.size), num_actors=actors,
                       address=address)


def stream_probabilities(predictor: Predictor, stream: Iterable[Batch]
                         ) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, its probabilities on the CPU) for every batch of one pass over `stream`.

    One batch behind: batch i+1 is queued on the device before batch i's result is copied
    back, so on CUDA the model runs while the next batch is fetched from the actors.
    """
    pending = None
    for batch in stream:
        probs = predictor.probabilities(batch.images)
        if pending is not None:
            yield pending[0], pending[1].cpu()
        pending = (batch, probs)
    if pending is not None:
        yield pending[0], pending[1].cpu()


@dataclass(frozen=True)
class SampleInfo:
    path: str  # as recorded by `tench shard`, relative to its source folder
    label: str | None  # the label name the json member records; None when it has none


def read_sample_info(source: ShardSource, split_meta: dict) -> dict[str, SampleInfo]:
    """key -> SampleInfo from the split's `.json` members.

    Batches carry keys only (the actors decode images, not metadata), so the paths come
    from one sequential read of the split's tars here, nothing decoded; `start_sample_info`
    runs it in a thread beside the stream.
    """
    info: dict[str, SampleInfo] = {}
    suffix = f".{INFO_EXT}"
    for entry in shard_entries(split_meta):
        with source.open(entry.name) as f:
            for name, data in iter_tar(f):
                if not name.endswith(suffix):
                    continue
                record = json.loads(data)
                key = name.rsplit("/", 1)[-1].partition(".")[0]
                label = record.get("label")
                info[key] = SampleInfo(str(record.get("path", "")),
                                       None if label in (None, "") else str(label))
    return info


def start_sample_info(source: ShardSource, split_meta: dict):
    """`read_sample_info` in a background thread; `.result()` gives the map."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tench-sample-info")
    future = pool.submit(read_sample_info, source, split_meta)
    pool.shutdown(wait=False)
    return future
