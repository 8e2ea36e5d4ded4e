"""The epoch plan: which samples each rank and each actor streams, as pure functions.

One epoch of a split is the concatenation of its shards in *epoch order* (sorted by
name, or shuffled from `(seed, epoch)` when training). Every rank derives the same
order, then:

- rank `r` takes positions `[r * per_rank, (r + 1) * per_rank)` of that sequence, with
  `per_rank = ceil(N / world_size)`; positions past `N` wrap to the start, so the short
  ranks repeat a few samples (at most `world_size - 1`, like torch's
  `DistributedSampler`). Every rank gets the same number of samples and so the same
  number of batches (data-parallel training never hangs), and the union is the whole
  split. With `drop_last=True`, `per_rank = N // world_size` instead (no repeats) and the
  last partial batch is dropped.
- the rank's batches are cut into `num_actors` contiguous runs, so only the last actor
  can hold the one partial batch, and each actor reads a few whole shards (plus at most
  two partial ones) rather than a slice of every shard.

A `Segment` is a run of samples `[start, stop)` inside one shard; an actor streams its
segments in order and skips nothing it does not have to read.

`plan_samples` applies the same rules to any sequence of segments: a resumed epoch
(`pipeline.resume`) plans what is left of it (`without` the samples already handed out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardEntry:
    """One shard as `meta.json` lists it: file name and number of samples."""

    name: str
    count: int


@dataclass(frozen=True)
class Segment:
    """Samples `[start, stop)` of shard `shard` (indices count samples, not tar members).

    `source` says which of a stream's sources holds the shard (0 when there is one).
    """

    shard: str
    start: int
    stop: int
    source: int = 0

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ActorTask:
    """What one actor streams in one epoch: its segments, cut into `batch_sizes`.

    It carries the run's `seed` and the `epoch` too, the one road by which they reach the
    actor: its shuffle buffer and every item's random transform are seeded from them.
    """

    actor: int
    segments: tuple[Segment, ...]
    batch_sizes: tuple[int, ...]  # all `batch_size` but possibly the last
    seed: int
    epoch: int
    rank: int = 0
    shuffle: bool = False

    @property
    def shuffle_seed(self) -> tuple[int, ...] | None:
        """Entropy for the actor's shuffle buffer; None: in order."""
        return (self.seed, self.epoch, 1, self.rank, self.actor) if self.shuffle else None

    def shuffle_rng(self) -> np.random.Generator | None:
        """The generator of the actor's shuffle buffer (the reader's and the resume's)."""
        seed = self.shuffle_seed
        return None if seed is None else np.random.default_rng(list(seed))

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: a task per actor and the order their batches are handed out."""

    tasks: tuple[ActorTask, ...]
    num_batches: int
    num_samples: int

    def delivery_order(self) -> list[tuple[int, int]]:
        """`(actor, batch index within that actor)` in the order the driver yields them.

        Round robin over actors, so the order is fixed by the plan (not by which actor
        happens to finish first) and every actor works ahead while others are consumed.
        """
        order = []
        longest = max((t.num_batches for t in self.tasks), default=0)
        for i in range(longest):
            order += [(t.actor, i) for t in self.tasks if i < t.num_batches]
        return order


def shard_entries(split_meta: dict) -> list[ShardEntry]:
    """The shards of one split from its `meta.json` entry, sorted by name."""
    entries = [ShardEntry(s["name"], int(s["count"])) for s in split_meta["shards"]]
    return sorted(entries, key=lambda e: e.name)


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    """A generator fixed by `(seed, epoch, *more)`: same inputs, same stream, on any machine."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *more]))


def shard_order(shards: Sequence[ShardEntry], *, shuffle: bool, seed: int, epoch: int
                ) -> list[ShardEntry]:
    """Shards in epoch order: by name, or permuted from `(seed, epoch)` (same on every rank)."""
    ordered = sorted(shards, key=lambda e: e.name)
    if not shuffle:
        return ordered
    perm = epoch_rng(seed, epoch, 0).permutation(len(ordered))
    return [ordered[i] for i in perm]


def samples_per_rank(total: int, world_size: int, drop_last: bool) -> int:
    return total // world_size if drop_last else -(-total // world_size)


def num_batches(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


def whole_shards(shards: Sequence[ShardEntry]) -> list[Segment]:
    """Each shard as one segment of all its samples."""
    return [Segment(e.name, 0, e.count) for e in shards]


def take_positions(ordered: Sequence[ShardEntry | Segment], lo: int, hi: int) -> list[Segment]:
    """Segments covering positions `[lo, hi)` of the concatenated shards (or segments),
    wrapping past the end."""
    segs = [s if isinstance(s, Segment) else Segment(s.name, 0, s.count) for s in ordered]
    total = sum(len(s) for s in segs)
    if total == 0:
        raise ValueError("no samples to plan: every shard is empty")
    starts = np.cumsum([0] + [len(s) for s in segs])
    segments: list[Segment] = []
    pos = lo
    while pos < hi:
        q = pos % total
        i = int(np.searchsorted(starts, q, side="right")) - 1  # segment holding position q
        start = q - int(starts[i])
        stop = min(len(segs[i]), start + (hi - pos))
        segments.append(Segment(segs[i].shard, segs[i].start + start, segs[i].start + stop,
                                segs[i].source))
        pos += stop - start
    return _merge(segments)


def slice_segments(segments: Sequence[Segment], lo: int, hi: int) -> list[Segment]:
    """Samples `[lo, hi)` of the concatenation of `segments`."""
    out, offset = [], 0
    for seg in segments:
        a, b = max(lo - offset, 0), min(hi - offset, len(seg))
        if a < b:
            out.append(Segment(seg.shard, seg.start + a, seg.start + b, seg.source))
        offset += len(seg)
    return out


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours that continue the same shard (a wrap can split one run in two)."""
    out: list[Segment] = []
    for seg in segments:
        last = out[-1] if out else None
        if last and (last.shard, last.source, last.stop) == (seg.shard, seg.source, seg.start):
            out[-1] = Segment(seg.shard, last.start, seg.stop, seg.source)
        else:
            out.append(seg)
    return out


def without(samples: Sequence[Segment], taken: Mapping[str, np.ndarray]) -> list[Segment]:
    """`samples` less the sample indices in `taken` (shard name -> indices), order kept.

    What is left of an epoch after some of it was consumed: runs of untouched samples.
    """
    out: list[Segment] = []
    for seg in samples:
        keep = np.ones(len(seg), np.int8)
        idx = np.asarray(taken.get(seg.shard, ()), np.int64)
        keep[idx[(idx >= seg.start) & (idx < seg.stop)] - seg.start] = 0
        edges = np.flatnonzero(np.diff(np.concatenate([[0], keep, [0]])))
        out += [Segment(seg.shard, seg.start + int(a), seg.start + int(b), seg.source)
                for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return _merge(out)


def plan_epoch(shards: Sequence[ShardEntry], *, batch_size: int, num_actors: int,
               shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
               drop_last: bool = False) -> EpochPlan:
    """Plan one rank's epoch: its part of the split, cut into batches, spread over actors."""
    ordered = shard_order(shards, shuffle=shuffle, seed=seed, epoch=epoch)
    return plan_samples(whole_shards(ordered), batch_size=batch_size, num_actors=num_actors,
                        shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                        world_size=world_size, drop_last=drop_last)


def plan_samples(samples: Sequence[Segment], *, batch_size: int, num_actors: int,
                 shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> EpochPlan:
    """Plan one rank's part of `samples` (in epoch order), cut into batches, over actors.

    `plan_epoch` gives it the whole split; a resumed epoch gives it only what is left, and
    the same rules (equal ranks, wrap or drop, contiguous actor runs) apply to that.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or num_actors < 1:
        raise ValueError(f"batch_size ({batch_size}) and num_actors ({num_actors}) must be >= 1")
    total = sum(len(s) for s in samples)
    per_rank = samples_per_rank(total, world_size, drop_last)
    nb = num_batches(per_rank, batch_size, drop_last)
    used = per_rank if not drop_last else nb * batch_size
    mine = take_positions(samples, rank * per_rank, rank * per_rank + used) if used else []
    tasks = []
    for a in range(num_actors):
        b0, b1 = a * nb // num_actors, (a + 1) * nb // num_actors
        lo, hi = b0 * batch_size, min(b1 * batch_size, used)
        sizes = tuple(min(batch_size, hi - s) for s in range(lo, hi, batch_size))
        tasks.append(ActorTask(a, tuple(slice_segments(mine, lo, hi)), sizes, seed, epoch,
                               rank, shuffle))
    return EpochPlan(tuple(tasks), nb, used)
