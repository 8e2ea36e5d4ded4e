"""A stream's place in an epoch as a small JSON dict, and the rest of the epoch from it.

A state says which plan a rank was playing (the settings the plan is a pure function of,
plus `rest`: the samples that play was planned over, None for the whole epoch) and how
many of its batches were handed out. Nothing more is needed:

- same layout (world size, actors, shuffle buffer, drop_last): the plan and its delivery
  order come out the same, so the stream skips the first `batches` and yields the rest
  exactly as an uninterrupted run would (each actor's skip count follows from the order).
- another layout (elastic): every old rank's state is needed. The samples each one was
  handed follow from its plan and the actor's record order (the same bounded shuffle the
  actor runs, replayed on positions instead of records), so what is left is the epoch
  less their union, as runs of samples; that is planned anew over the new ranks with the
  usual rules (`pipeline.plan.plan_samples`) and becomes the new states' `rest`.

Keys are never stored: a state is a few numbers plus, after an elastic resume, the runs
left of the epoch (up to about one per shuffle-buffer slot of each old actor).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice

import numpy as np

from pipeline.actors import shuffled
from pipeline.plan import (
    ActorTask,
    EpochPlan,
    Segment,
    ShardEntry,
    plan_samples,
    shard_order,
    whole_shards,
    without,
)

STATE_VERSION = 1
# must match for a state to be used at all: they decide which samples and batches exist
IDENTITY = ("split", "seed", "batch_size", "shards")
# the same as the state's: the exact order goes on; otherwise the rest is planned anew
LAYOUT = ("world_size", "num_actors", "shuffle", "shuffle_buffer", "drop_last")
FIELDS = ("version", *IDENTITY, "rank", *LAYOUT, "epoch", "batches", "rest")


@dataclass
class Position:
    """Where a play of an epoch stands: `batches` of the plan over `rest` handed out."""

    epoch: int
    rest: tuple[Segment, ...] | None = None  # the samples planned over; None: the whole epoch
    batches: int = 0


def shards_fingerprint(vocab_fingerprint: str, shards: Sequence[ShardEntry]) -> str:
    """A short hash of the vocab and a split's shard list (names and sample counts)."""
    listing = json.dumps([vocab_fingerprint, [[e.name, e.count] for e in shards]])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def state_of(setup: Mapping, at: Position) -> dict:
    """The JSON-able state: `setup` (the `IDENTITY`, `rank` and `LAYOUT` fields) at `at`."""
    rest = None if at.rest is None else [[s.shard, s.start, s.stop] for s in at.rest]
    return {"version": STATE_VERSION, **setup, "epoch": at.epoch, "batches": at.batches,
            "rest": rest}


def plan_at(shards: Sequence[ShardEntry], setup: Mapping, at: Position) -> EpochPlan:
    """The plan a rank with `setup` plays at `at` (a pure function of the two)."""
    return plan_samples(epoch_samples(shards, setup, at), batch_size=setup["batch_size"],
                        num_actors=setup["num_actors"], shuffle=setup["shuffle"],
                        seed=setup["seed"], epoch=at.epoch, rank=setup["rank"],
                        world_size=setup["world_size"], drop_last=setup["drop_last"])


def epoch_samples(shards: Sequence[ShardEntry], setup: Mapping, at: Position) -> list[Segment]:
    """The samples the play at `at` plans over, in epoch order."""
    if at.rest is not None:
        return list(at.rest)
    return whole_shards(shard_order(shards, shuffle=setup["shuffle"], seed=setup["seed"],
                                    epoch=at.epoch))


def record_order(task: ActorTask, shuffle_buffer: int) -> Iterator[int]:
    """Positions in `task`'s samples in the order its actor batches them.

    The same bounded shuffle, from the same seed, as `ShardReader._iter_batches` runs on
    the records themselves (tests/test_plan.py checks the two against each other).
    """
    return shuffled(range(task.num_samples), shuffle_buffer, task.shuffle_rng())


def handed_out(plan: EpochPlan, batches: int, shuffle_buffer: int) -> dict[str, np.ndarray]:
    """Shard name -> indices of the samples in the first `batches` batches the plan delivers."""
    per_actor = Counter(actor for actor, _ in plan.delivery_order()[:batches])
    found: dict[str, list] = defaultdict(list)
    for task in plan.tasks:
        n = sum(task.batch_sizes[:per_actor[task.actor]])
        if not n:
            continue
        pos = np.fromiter(islice(record_order(task, shuffle_buffer), n), np.int64, n)
        starts = np.cumsum([0] + [len(s) for s in task.segments])
        which = np.searchsorted(starts, pos, side="right") - 1
        for i, seg in enumerate(task.segments):
            found[seg.shard].append(pos[which == i] - starts[i] + seg.start)
    return {shard: np.unique(np.concatenate(parts)) for shard, parts in found.items()}


def resume(states: Mapping | Sequence[Mapping], shards: Sequence[ShardEntry], here: Mapping,
           plan_of: Callable[[Mapping, Position], EpochPlan] | None = None) -> Position:
    """Where a stream set up as `here` goes on from `states` (one rank's, or every rank's).

    A finished epoch gives the next one at its start. Refuses states from other shards,
    seed, split or batch size, and an elastic resume without every old rank's state.
    `plan_of(setup, position)`: the plans of a stream over several sources (`pipeline.mix`),
    which resumes on the same layout only.
    """
    states = [states] if isinstance(states, Mapping) else list(states)
    if not states:
        raise ValueError("load_state_dict: no stream state given")
    positions = [_read(s, shards, here) for s in states]
    _check_together(states, positions)
    for state, at in zip(states, positions, strict=True):
        if state["rank"] == here["rank"] and all(state[k] == here[k] for k in LAYOUT):
            plan = (plan_of or partial(plan_at, shards))(state, at)
            if at.batches > plan.num_batches:
                raise ValueError(f"load_state_dict: the state has {at.batches} batches handed "
                                 f"out of an epoch of {plan.num_batches}")
            return at if at.batches < plan.num_batches else Position(at.epoch + 1)
    if plan_of is not None:
        raise ValueError("load_state_dict: a stream over several sources resumes only on the "
                         "same layout (rank, world size, actors, shuffle buffer, drop_last)")
    world = states[0]["world_size"]
    missing = sorted(set(range(world)) - {s["rank"] for s in states})
    if missing:
        changed = [f"{k} {states[0][k]!r} -> {here[k]!r}" for k in LAYOUT
                   if states[0][k] != here[k]]
        raise ValueError(f"load_state_dict: the state is from another layout "
                         f"({', '.join(changed) or 'another rank'}); to re-plan the rest of "
                         f"the epoch, give the states of all {world} old ranks (ranks "
                         f"{missing} are missing)")
    taken: dict[str, list] = defaultdict(list)
    for state, at in zip(states, positions, strict=True):
        for shard, idx in handed_out(plan_at(shards, state, at), at.batches,
                                     state["shuffle_buffer"]).items():
            taken[shard].append(idx)
    left = without(epoch_samples(shards, states[0], positions[0]),
                   {shard: np.concatenate(parts) for shard, parts in taken.items()})
    epoch = positions[0].epoch
    return Position(epoch, tuple(left)) if left else Position(epoch + 1)


def _read(state: Mapping, shards: Sequence[ShardEntry], here: Mapping) -> Position:
    """Check one state against this stream and the shards; its position."""
    if not isinstance(state, Mapping):
        raise TypeError(f"load_state_dict: a stream state is a dict, got {type(state).__name__}")
    lacking = [k for k in FIELDS if k not in state]
    if lacking:
        raise ValueError(f"load_state_dict: not a ShardStream state (no {', '.join(lacking)})")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"load_state_dict: state version {state['version']!r}, this tench "
                         f"reads version {STATE_VERSION}")
    for key in IDENTITY:
        if state[key] != here[key]:
            what = (" (a fingerprint of meta.json's vocab and the split's shard names and "
                    "counts: other shards)") if key == "shards" else ""
            raise ValueError(f"load_state_dict: the state is from a stream with {key} "
                             f"{state[key]!r}, this stream has {here[key]!r}{what}")
    if not 0 <= state["rank"] < state["world_size"] or state["batches"] < 0:
        raise ValueError(f"load_state_dict: rank {state['rank']} of {state['world_size']}, "
                         f"{state['batches']} batches: not a valid state")
    if state["rest"] is None:
        return Position(int(state["epoch"]), None, int(state["batches"]))
    counts = {e.name: e.count for e in shards}
    rest = tuple(Segment(str(name), int(a), int(b)) for name, a, b in state["rest"])
    for seg in rest:
        if seg.shard not in counts or not 0 <= seg.start < seg.stop <= counts[seg.shard]:
            raise ValueError(f"load_state_dict: the state's rest names samples "
                             f"{seg.start}-{seg.stop} of {seg.shard!r}, which this split "
                             "does not have")
    return Position(int(state["epoch"]), rest, int(state["batches"]))


def _check_together(states: list, positions: list[Position]) -> None:
    """Several states must be the ranks of one run at one epoch."""
    if len(states) < 2:
        return
    for key, values in (("epoch", [p.epoch for p in positions]),
                        ("world_size", [s["world_size"] for s in states]),
                        ("rest", [p.rest for p in positions])):
        if any(v != values[0] for v in values):
            shown = values if key != "rest" else "differs"
            raise ValueError(f"load_state_dict: the states are not from one run at one time "
                             f"({key}: {shown})")
    ranks = [s["rank"] for s in states]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"load_state_dict: ranks {sorted(ranks)} appear more than once")
