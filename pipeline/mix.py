"""Several data sets in one epoch: concatenated, or drawn in given proportions (pure functions).

A stream over several sources (each a shards folder/URL with the same vocab) plans its
epoch as one sequence of `Segment`s whose `source` field says where each shard lives; the
usual rules (`pipeline.plan.plan_samples`: ranks, batches, actors) then apply unchanged.

- `concat_epoch`: every shard of every source once, in the order a single source's epoch
  would use (sorted, or permuted from `(seed, epoch)`).
- `mix_epoch`: `epoch_size` samples, source `i` giving its share `weights[i] / sum(weights)`
  of them. In epoch `e` each source is read as a sequence of *passes*, each pass its
  shards in a fresh order drawn from `(seed, e, source, pass)`, and gives the first `n_i`
  samples of that sequence. So a source smaller than its share cycles through a fresh
  shuffle of itself before any sample repeats, and a larger one gives `n_i` different
  samples, a fresh draw (of whole shards, the last in part) each epoch. The sources' runs
  are then cut into pieces of at most `MIX_RUN` samples and interleaved by where each
  piece's middle falls in its source's share, so every stretch of the epoch holds the
  sources in proportion (within `MIX_RUN` samples); the actors' shuffle buffer mixes the
  pieces within batches. (A piece reads its shard from the start up to the piece: pieces
  of one shard cost re-reads, local ones with `cache_dir`.)

Every function is a pure function of its arguments: each rank derives the same epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.plan import Segment, ShardEntry, epoch_rng, take_positions

MIX_RUN = 256  # longest run of one source in a mixed epoch, in samples


def source_counts(epoch_size: int, weights: Sequence[float]) -> list[int]:
    """Samples per source in an epoch of `epoch_size`: proportional, summing exactly to it
    (largest remainders, ties to the earlier source)."""
    if epoch_size < 1:
        raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    exact = [epoch_size * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:epoch_size - sum(counts)]:
        counts[i] += 1
    return counts


def pass_order(shards: Sequence[ShardEntry], source: int, *, shuffle: bool, seed: int,
               epoch: int, pass_index: int) -> list[Segment]:
    """One pass over a source: its shards as whole segments, by name or permuted."""
    ordered = sorted(shards, key=lambda e: e.name)
    if shuffle:
        perm = epoch_rng(seed, epoch, 2, source, pass_index).permutation(len(ordered))
        ordered = [ordered[i] for i in perm]
    return [Segment(e.name, 0, e.count, source) for e in ordered]


def source_run(shards: Sequence[ShardEntry], source: int, count: int, *, shuffle: bool,
               seed: int, epoch: int) -> list[Segment]:
    """The first `count` samples of a source's passes in `epoch`."""
    total = sum(e.count for e in shards)
    if total == 0:
        raise ValueError(f"source {source} has no samples to draw from")
    out: list[Segment] = []
    pos, hi = 0, count
    while pos < hi:
        p, q = divmod(pos, total)
        take = min(hi - pos, total - q)
        order = pass_order(shards, source, shuffle=shuffle, seed=seed, epoch=epoch,
                           pass_index=p)
        out += take_positions(order, q, q + take)
        pos += take
    return out


def cut(segments: Sequence[Segment], run: int) -> list[list[Segment]]:
    """`segments` cut into consecutive pieces of `run` samples (the last may be shorter)."""
    pieces: list[list[Segment]] = [[]]
    room = run
    for seg in segments:
        start = seg.start
        while start < seg.stop:
            if room == 0:
                pieces.append([])
                room = run
            stop = min(seg.stop, start + room)
            pieces[-1].append(Segment(seg.shard, start, stop, seg.source))
            room -= stop - start
            start = stop
    return [p for p in pieces if p]


def interleave(runs: Sequence[Sequence[Segment]], run: int = MIX_RUN) -> list[Segment]:
    """The sources' runs spread evenly through one sequence (see the module doc)."""
    placed = []
    for i, segs in enumerate(runs):
        n = sum(len(s) for s in segs)
        done = 0
        for piece in cut(segs, run):
            size = sum(len(s) for s in piece)
            placed.append(((done + size / 2) / n, i, piece))
            done += size
    placed.sort(key=lambda t: (t[0], t[1]))
    return [seg for _, _, piece in placed for seg in piece]


def mix_epoch(sources: Sequence[Sequence[ShardEntry]], weights: Sequence[float],
              epoch_size: int, *, shuffle: bool, seed: int, epoch: int,
              run: int = MIX_RUN) -> list[Segment]:
    """Epoch `epoch` of `epoch_size` samples drawn from `sources` in proportion to `weights`."""
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources; give one each")
    counts = source_counts(epoch_size, weights)
    runs = [source_run(shards, i, n, shuffle=shuffle, seed=seed, epoch=epoch)
            for i, (shards, n) in enumerate(zip(sources, counts, strict=True)) if n]
    return interleave(runs, run)


def concat_epoch(sources: Sequence[Sequence[ShardEntry]], *, shuffle: bool, seed: int,
                 epoch: int) -> list[Segment]:
    """Every shard of every source once: by source then name, or permuted from (seed, epoch)."""
    ordered = [Segment(e.name, 0, e.count, i) for i, shards in enumerate(sources)
               for e in sorted(shards, key=lambda e: e.name)]
    if not shuffle:
        return ordered
    perm = epoch_rng(seed, epoch, 0).permutation(len(ordered))
    return [ordered[i] for i in perm]
