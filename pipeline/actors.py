"""One stream actor: read its shards, shuffle the encoded records, decode + transform, batch.

`ShardReader` is a plain class; `pipeline.stream` runs it as a Ray actor and the tests
also call it directly. The driver hands it an `ActorTask` and the item transform chain
per epoch (`start`; the chain travels once per epoch, so its size may change between
epochs) and then asks for the next few batches per call (`next_batches`), keeping a few
calls in flight.

Reproducible: the record order comes from the task (its segments and shuffle seed) and
every item's random transform draws from a generator seeded by `(seed, epoch, key)`, so
an epoch is the same on every run, whatever the timing; and a restarted actor can
replay its task, skipping the batches already delivered without decoding them.

Shuffling works on encoded records (the bytes as stored, 5-50 KB each), not decoded
images, so the buffer costs a few MB, and decoding happens once, just before batching.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice

import numpy as np
import torch

from pipeline.decode import DecodeError, decode_image
from pipeline.plan import ActorTask, Segment
from pipeline.read_ahead import ReadAhead
from pipeline.settings import ON_ERROR
from pipeline.source import RawSample, ShardReadError, ShardSource, read_segment


@dataclass(frozen=True)
class Skip:
    """Samples left out under `on_error="skip"`: where, how many, and why."""

    shard: str
    where: str  # a sample key, or a range of sample indices in the shard
    count: int
    reason: str

    def __str__(self) -> str:
        return f"shard {self.shard}, {self.where}: skipped {self.count} ({self.reason})"


@dataclass
class BatchData:
    """A batch as it crosses the object store; numpy, so it arrives without a copy."""

    images: np.ndarray  # (B, H, W, 3) uint8, read-only on the driver
    labels: np.ndarray  # (B,) int64
    keys: list
    skips: list = field(default_factory=list)  # Skips found while making this batch
    padded: int = 0  # slots refilled with a repeat of a good item (skip mode only)


class StaleRequest(RuntimeError):
    """A `next_batches` meant for an earlier `start` (left over from a restart or early stop)."""


def use_ray_thread_count() -> None:
    """Give torch the thread count Ray chose for this worker (`OMP_NUM_THREADS`).

    Ray sets it to the task's or actor's CPUs (1 by default), but torch reads it only when
    it is imported, which a worker that preloaded torch (`pipeline.ray_setup.PRELOAD_MODULES`)
    did before Ray set it: two threads per actor with an actor per core made the stream
    several times slower. Unset (a plain process using `ShardReader` directly): torch is
    left alone.
    """
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


class ItemRandom:
    """Randomness for one item, fixed by `(seed, epoch, key)`, independent of actor and timing.

    Calling it re-seeds one PCG64 generator from a hash of the three and returns it: ~2 us,
    where a fresh `default_rng` per item cost ~9 us (its seed hashing; both printed by
    `bench/kernel_bench.py`). The generator is the same object every call, valid until the
    next one; a transform draws from it during its own call and keeps nothing.
    """

    def __init__(self):
        self._bits = np.random.PCG64(0)
        self._rng = np.random.Generator(self._bits)

    def __call__(self, seed: int, epoch: int, key: str) -> np.random.Generator:
        digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=32).digest()
        self._bits.state = {
            "bit_generator": "PCG64",
            "state": {"state": int.from_bytes(digest[:16], "little"),
                      "inc": int.from_bytes(digest[16:], "little") | 1},  # PCG wants it odd
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._rng


def shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator | None) -> Iterator:
    """A bounded shuffle: keep `buffer_size` items, emit a random one as each new one arrives."""
    if rng is None or buffer_size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardReader:
    """Streams one actor's share of each epoch as uint8 batches of the chain's size."""

    def __init__(self, source: ShardSource | Sequence[ShardSource], on_error: str = "fail",
                 shuffle_buffer: int = 1000):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        # several sources: a segment's `source` picks one (pipeline.mix)
        self.sources = [source] if isinstance(source, ShardSource) else list(source)
        self.source, self.on_error, self.shuffle_buffer = self.sources[0], on_error, shuffle_buffer
        self.item_tfm: Callable | None = None  # this task's chain, set by `start`
        self.size, self.decode_size = 0, None  # its output side and decode hint
        use_ray_thread_count()  # one actor, one core's work
        self._item_rng = ItemRandom()
        self._token = None
        self._batches: Generator[BatchData] = (b for b in ())
        self._skips: list[Skip] = []
        self._last_good = None  # (image, label, key) to refill a batch with nothing readable

    def pid(self) -> int:
        return os.getpid()

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def start(self, task: ActorTask, item_tfm: Callable, token: str, skip_batches: int = 0
              ) -> int:
        """Begin (or, after a restart, resume) a task; `next_batches(token, n)` then walks it.

        `item_tfm` (a chain with `size` and `decode_size`, see `pipeline.transforms.Compose`)
        serves this task's batches.
        """
        self._batches.close()  # the previous task's downloads end now, not when collected
        self._token, self._skips, self._last_good = token, [], None
        self.item_tfm, self.size = item_tfm, item_tfm.size
        self.decode_size = getattr(item_tfm, "decode_size", None)
        self._batches = self._iter_batches(task, skip_batches)
        return os.getpid()

    def next_batches(self, token: str, count: int = 1) -> list[BatchData]:
        """The task's next `count` batches (fewer at its end), returned as one Ray object.

        Several batches per call because Ray's cost is per object (the raylet's plasma
        work, the caller's `ray.get`), not per byte: on 2 cores, 64-image batches of
        128 px streamed 3,100 images/s one per object and 3,340 four per object
        (`bench/stream_profile.py sweep --batch-sizes 64 --per-call 1 4`).
        """
        if token != self._token:
            raise StaleRequest(f"batch request for task {token}, running {self._token}")
        return list(islice(self._batches, count))

    # ------------------------------------------------------------------ the pipeline
    def _iter_batches(self, task: ActorTask, skip_batches: int) -> Generator[BatchData]:
        reads = self._records(task.segments)
        records = shuffled(reads, self.shuffle_buffer, task.shuffle_rng())
        try:
            for b, n in enumerate(task.batch_sizes):
                chunk = list(islice(records, n))  # may be short when a shard was skipped
                if b == len(task.batch_sizes) - 1:
                    reads.close()  # every record is taken: end the reads and read-aheads now
                if b >= skip_batches:  # batches below were delivered before a restart
                    yield self._assemble(chunk, n, task.seed, task.epoch)
        finally:
            reads.close()  # a task dropped early (a new `start`) ends its downloads too

    def _records(self, segments: Sequence[Segment]) -> Iterator[RawSample]:
        ahead = ReadAhead(self.sources, segments)  # remote: the next shard downloads meanwhile
        try:
            for i, seg in enumerate(segments):
                done = 0
                try:
                    for sample in read_segment(self.sources[seg.source], seg, ahead.opener(i)):
                        done += 1
                        yield replace(sample, source=seg.source) if seg.source else sample
                except ShardReadError as e:
                    if self.on_error == "fail":
                        raise
                    where = f"samples {seg.start + done}-{seg.stop - 1}"
                    self._skips.append(Skip(seg.shard, where, len(seg) - done, e.reason))
        finally:
            ahead.close()

    def _assemble(self, chunk: list[RawSample], n: int, seed: int, epoch: int) -> BatchData:
        images = np.empty((n, self.size, self.size, 3), np.uint8)  # (B, H, W, C)
        labels = np.empty(n, np.int64)
        keys: list = [None] * n
        for i, sample in enumerate(chunk):
            if sample.problem is not None:  # damaged or malformed: never decoded
                if self.on_error == "fail":
                    raise ShardReadError(sample.shard, f"sample {sample.key} {sample.problem}")
                self._skips.append(Skip(sample.shard, f"sample {sample.key}", 1, sample.problem))
                continue
            try:
                images[i] = self._load(sample, seed, epoch)
            except DecodeError as e:
                if self.on_error == "fail":
                    raise ShardReadError(sample.shard, f"sample {sample.key}.{sample.ext}: {e}"
                                         ) from e
                self._skips.append(Skip(sample.shard, f"sample {sample.key}", 1, str(e)))
                continue
            labels[i], keys[i] = sample.label, sample.key
        padded = self._refill(images, labels, keys, chunk)
        skips, self._skips = self._skips, []
        return BatchData(images, labels, keys, skips, padded)

    def _load(self, sample: RawSample, seed: int, epoch: int) -> np.ndarray:
        where = f"{self.sources[sample.source].url_of(sample.shard)}:{sample.key}.{sample.ext}"
        image = decode_image(sample.data, sample.ext, self.decode_size, source=where)
        out = self.item_tfm(image, self._item_rng(seed, epoch, sample.key))
        if out.shape != (self.size, self.size, 3) or out.dtype != np.uint8:
            raise ValueError(
                f"item transforms gave {out.dtype} {out.shape} for {where}, but the chain "
                f"declares uint8 ({self.size}, {self.size}, 3): a transform after its last "
                "crop changed the shape")
        return out

    def _refill(self, images: np.ndarray, labels: np.ndarray, keys: list,
                chunk: list[RawSample]) -> int:
        """Keep the planned batch size after skips by repeating good items (counted).

        Equal batch counts on every rank matter more than a few repeats: a short or empty
        batch would hang data-parallel training or break batch norm.
        """
        good = [i for i, k in enumerate(keys) if k is not None]
        holes = [i for i, k in enumerate(keys) if k is None]
        if good:
            last = good[-1]
            self._last_good = (images[last].copy(), labels[last], keys[last])
        if not holes:
            return 0
        if good:
            fillers = [(images[i], labels[i], keys[i]) for i in good]
        elif self._last_good is not None:
            fillers = [self._last_good]
        else:
            shards = sorted({s.shard for s in chunk} | {s.shard for s in self._skips})
            raise ShardReadError(", ".join(shards) or "?",
                                 "nothing readable to fill a batch with; check these shards")
        for j, i in enumerate(holes):
            images[i], labels[i], keys[i] = fillers[j % len(fillers)]
        return len(holes)
