"""`ShardStream`: batches from tar shards, decoded and transformed as uint8 by Ray actors.

The driver (the training process) reads `meta.json`, plans each epoch (`pipeline.plan`),
gives each actor its segments and keeps `prefetch` requests in flight per actor, each for
the actor's next `batches_per_call` batches (one Ray object), asking for more before it
hands out what it has. Batches come back through Ray's object store as numpy arrays (no
copy); the driver makes one plain copy of each, which releases the object, and hands it out
as the `(B, 3, H, W)` uint8 tensor of a `Batch`, channels-last in memory (the layout the
trainer converts to anyway).

Memory is fixed by configuration, not by the data: at most `num_actors * prefetch *
batches_per_call` batches wait in the object store (plus the one object per actor being
handed out), each actor holds `shuffle_buffer` encoded records, and shards are streamed,
never held whole. Released objects leave the store at once only where Ray is told to free
them so (`pipeline.ray_setup.FREE_AT_ONCE`, as the Ray tench starts is); Ray's default
deletes them in batches every second, so the store also holds about a second of batches.

Faults: an actor that dies mid-epoch is restarted by Ray (`max_restarts`) and replays its
task from the first batch the driver has not received, so the epoch still yields every
sample once, in the same order as without the fault.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import ray
from ray.exceptions import ActorUnavailableError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.actors import ShardReader, Skip
from pipeline.batch import Batch
from pipeline.feed import RESTART_WAIT_S, ActorFeed, to_batch
from pipeline.mix import concat_epoch, mix_epoch
from pipeline.plan import (
    EpochPlan,
    Segment,
    num_batches,
    plan_epoch,
    plan_samples,
    samples_per_rank,
    shard_entries,
)
from pipeline.ray_setup import ensure_ray
from pipeline.resume import Position, plan_at, resume, shards_fingerprint, state_of
from pipeline.settings import StreamSettings
from pipeline.source import ShardSource
from pipeline.transforms import item_chain
from shards.vocab import Vocab

log = logging.getLogger(__name__)

class ShardStream:
    """Iterate a split of a shards folder/URL as `Batch`es: one full epoch per iteration.

    `ShardStream(source, split, settings, **changes)`: `settings` (a `StreamSettings`,
    default its defaults) with any of its fields changed by keyword, e.g.
    `ShardStream("shards", "train", batch_size=64, size=128, seed=0)`.

    `len(stream)` is the exact number of batches per epoch (the same on every rank). Each
    iteration plays epoch `stream.epoch` and then advances it; `set_epoch(e)` picks one.
    The order depends on `(seed, epoch, num_actors, world_size, rank)` only, and an item's
    random augmentation on `(seed, epoch, key)` only. `state_dict()`/`load_state_dict()`
    resume mid-epoch, on the same or another world size (`pipeline.resume`).

    - `source`: a folder, `file://`, `http(s)://` or `s3://...` URL holding `meta.json`;
      `storage_options` go to fsspec, e.g. an S3-compatible store:
      `{"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}` (without
      them s3fs reads the usual AWS environment variables and config files).
    - `item_tfms`: a list of item transforms or one composed chain; the chain says its
      output `size` and decode size (`pipeline.transforms.Compose`). None: `train_tfms(size)`
      / `valid_tfms(size)` by split. `size` only picks the default chain's size (or, with
      `item_tfms`, must agree with it). `set_item_tfms`/`set_size` change it for the next
      epoch, on the same actors.
    - several sources (a list; `pipeline.mix`): all must have one vocab. Without `weights`
      an epoch is every source's split once; with `weights` (one per source) it is
      `epoch_size` samples (default: all the sources' samples) drawn in that proportion,
      spread evenly through the epoch, a small source cycling through fresh shuffles of
      itself. `stats` are the first source's. `load_state_dict` then resumes only on the
      same layout (world size, actors, shuffle buffer, drop_last), not elastically.
    - `address`: None starts Ray here if it is not running; "auto" or "ray://..." joins.
    - memory: at most `num_actors * (prefetch + 1) * batches_per_call` batches wait in
      Ray's object store, plus `shuffle_buffer` encoded records per actor; nothing grows
      with the data set. (On a cluster whose `ray start` did not set
      `RAY_free_objects_period_milliseconds`, add about a second of batches: see the
      module doc.)
    """

    def __init__(
        self,
        source: str | Path | ShardSource | Sequence[str | Path | ShardSource],
        split: str = "train",
        settings: StreamSettings | None = None,
        *,
        item_tfms: Callable | Sequence[Callable] | None = None,
        size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        address: str | None = None,
        storage_options: dict | None = None,
        vocab: Vocab | None = None,
        weights: Sequence[float] | None = None,
        epoch_size: int | None = None,
        **changes,
    ):
        if settings is not None and not isinstance(settings, StreamSettings):
            raise TypeError(f"settings must be a StreamSettings, got {settings!r}; give "
                            "batch_size and the other settings by keyword")
        self.settings = (settings or StreamSettings()).replace(**changes)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.set_item_tfms(item_tfms, size)
        given = [source] if isinstance(source, str | Path | ShardSource) else list(source)
        if not given:
            raise ValueError("ShardStream: no source given")
        self.sources = [ShardSource.of(s, storage_options, self.settings.remote()) for s in given]
        self.source = self.sources[0]
        self.source_shards = [self._read_meta(src, vocab) for src in self.sources]
        self.shards = self.source_shards[0]
        self._set_mix(weights, epoch_size)
        self.epoch = 0
        self._plays = 0  # iterations started; only the latest may run (actors are shared)
        self.skips: list[Skip] = []  # what the last epoch skipped (on_error="skip")
        self.padded = 0  # slots the last epoch refilled with repeats after skips
        self._pending: Position | None = None  # a loaded state: where the next play starts
        self._now: Position | None = None  # the running play: batches handed out so far
        self._check_not_empty()
        self.started_ray = ensure_ray(address)
        wanted = self.settings.num_actors
        if wanted is None:
            wanted = max(1, int(ray.cluster_resources().get("CPU", 1)) // world_size)
        self.num_actors = max(1, min(wanted, len(self)))
        self._actors = self._make_actors()

    def _read_meta(self, source: ShardSource, vocab: Vocab | None) -> list:
        """This split's shards from `source`'s `meta.json`, checked; the first sets the vocab
        and stats, and every other must have the same vocab."""
        meta = source.read_meta()
        where = source.url_of("meta.json")
        found = Vocab.from_json(meta)  # refuses a fingerprint that disagrees
        if source is self.source:
            if vocab is not None:
                vocab.check_fingerprint(meta["vocab_fingerprint"], f"the shards at {source.url}")
            self.vocab, self.stats = vocab or found, meta["stats"]
        elif found.fingerprint != self.vocab.fingerprint:
            raise ValueError(f"{where} has another vocab (fingerprint {found.fingerprint}, "
                             f"{len(found)} labels) than {self.source.url_of('meta.json')} "
                             f"({self.vocab.fingerprint}, {len(self.vocab)} labels); shard "
                             "one with `tench shard --vocab-from` the other to share it")
        splits = meta["splits"]
        if self.split not in splits:
            raise ValueError(f"{where}: no split {self.split!r}; it has {sorted(splits)}")
        shards = shard_entries(splits[self.split])
        count = sum(e.count for e in shards)
        if count != splits[self.split]["count"] or count == 0:
            raise ValueError(f"{where}: split {self.split!r} lists "
                             f"{splits[self.split]['count']} samples but its shards hold "
                             f"{count}")
        return shards

    def _set_mix(self, weights: Sequence[float] | None, epoch_size: int | None) -> None:
        """Samples per epoch; `self.mixed`: the epoch is planned by `pipeline.mix`."""
        total = sum(e.count for shards in self.source_shards for e in shards)
        if weights is None and epoch_size is not None:
            raise ValueError("ShardStream: epoch_size needs weights (one per source)")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(self.sources):
                raise ValueError(f"ShardStream: {len(weights)} weights for "
                                 f"{len(self.sources)} sources; give one each")
            mix_epoch(self.source_shards, weights, epoch_size or total, shuffle=False,
                      seed=0, epoch=0, run=max(total, 1))  # checks the weights early
        self.weights, self.num_samples = weights, epoch_size or total
        self.mixed = weights is not None or len(self.sources) > 1

    def _check_not_empty(self) -> None:
        if len(self) == 0:
            raise ValueError(f"{self.source.url_of('meta.json')}: split {self.split!r} has "
                             f"{self.num_samples} samples, fewer than one batch of "
                             f"{self.batch_size} per rank with drop_last=True")

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        per_rank = samples_per_rank(self.num_samples, self.world_size, self.drop_last)
        return num_batches(per_rank, self.batch_size, self.drop_last)

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def drop_last(self) -> bool:
        return self.settings.drop_last

    @drop_last.setter
    def drop_last(self, value: bool) -> None:
        """The trainer drops a lone last sample (it would break BatchNorm) once it knows N."""
        self.settings = self.settings.replace(drop_last=value)
        self._check_not_empty()

    @property
    def size(self) -> int:
        """The side of the images in the next epoch's batches (the chain's output size)."""
        return self.item_tfm.size

    @property
    def batches_per_call(self) -> int:
        return self.settings.batches_per_call_at(self.size)

    def set_item_tfms(self, item_tfms: Callable | Sequence[Callable] | None = None,
                      size: int | None = None) -> None:
        """Use this chain from the next iteration on (see the class doc for the arguments).

        The actors receive the chain with each epoch's task, so a new size (progressive
        resizing) needs no new actors.
        """
        self.item_tfm = item_chain(item_tfms, self.split, size)
        self._custom_tfms = item_tfms is not None

    def set_size(self, size: int) -> None:
        """The split's default chain at `size` x `size` from the next iteration on."""
        if self._custom_tfms:
            raise ValueError("this ShardStream has its own item_tfms; to change their size "
                             "give new ones to set_item_tfms")
        self.set_item_tfms(None, size)

    @property
    def skipped(self) -> int:
        """Samples the last epoch could not read (on_error="skip")."""
        return sum(s.count for s in self.skips)

    def set_epoch(self, epoch: int) -> None:
        """Play `epoch` next: the shard order, shuffle buffer and item randomness follow it.
        A loaded state's epoch goes on from where it stopped."""
        self.epoch = int(epoch)
        self._now = None
        if self._pending is not None and self._pending.epoch != self.epoch:
            self._pending = None

    def state_dict(self) -> dict:
        """Where this rank stands: a small JSON-able dict for `load_state_dict`.

        Mid-epoch it counts the batches handed out by the iteration (not those prefetched);
        between epochs it names the next one.
        """
        return state_of(self._setup(), self._now or self._pending or Position(self.epoch))

    def load_state_dict(self, state: dict | Sequence[dict]) -> None:
        """Go on from a `state_dict()`: the next iteration yields the rest of its epoch.

        With this rank's state from the same layout (world size, actors, shuffle buffer,
        drop_last), exactly the batches an uninterrupted run would have yielded. With the
        list of every rank's state from another layout, this rank's part of what no old rank
        was handed (`pipeline.resume`). States from other shards, seed, split or batch size
        are refused.
        """
        plan_of = self._plan_at if self.mixed else None
        at = resume(state, self.shards, self._setup(), plan_of)
        self.epoch, self._now = at.epoch, None
        self._pending = at if at.batches or at.rest is not None else None

    def batches_left(self) -> int:
        """Batches the next iteration yields: `len(self)`, or the rest of a loaded epoch."""
        at = self._pending or Position(self.epoch)
        return plan_at(self.shards, self._setup(), at).num_batches - at.batches

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan for `epoch` (default: the next one)."""
        if self.mixed:
            return self._plan_at(self._setup(), Position(self.epoch if epoch is None else epoch))
        return plan_epoch(self.shards, batch_size=self.batch_size, num_actors=self.num_actors,
                          shuffle=self.settings.shuffles(self.split), seed=self.settings.seed,
                          epoch=self.epoch if epoch is None else epoch, rank=self.rank,
                          world_size=self.world_size, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        if self._actors is None:
            raise RuntimeError("this ShardStream is closed")
        epoch, self.epoch = self.epoch, self.epoch + 1
        self._now, self._pending = self._pending or Position(epoch), None
        self._plays += 1
        # the chain and call size are fixed now, not when the first batch is asked for
        return self._play(self._now, self._plays, self.item_tfm, self.batches_per_call)

    def close(self) -> None:
        """Stop this stream's actors. Ray itself stays up: other streams may share it."""
        for actor in self._actors or ():
            ray.kill(actor, no_restart=True)
        self._actors = None

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def actor_pids(self) -> list[int]:
        """Process ids of the actors (for monitoring, and for the crash tests)."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                return ray.get([a.pid.remote() for a in self._actors])
            except ActorUnavailableError:  # one is being restarted
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def actor_nodes(self) -> list[str]:
        """The Ray node id each actor runs on, in actor order."""
        return ray.get([a.node_id.remote() for a in self._actors])

    def __repr__(self) -> str:
        return (f"ShardStream({self.source.url!r}, split={self.split!r}, "
                f"batch_size={self.batch_size}, size={self.size}, {len(self)} batches, "
                f"{self.num_actors} actors, rank {self.rank}/{self.world_size})")

    # ------------------------------------------------------------------ internals
    def _make_actors(self) -> list:
        # Ray's actor default: one CPU to place it, none held while it runs, so a train and
        # a valid stream and Ray Train workers all fit at once.
        here = ray.get_runtime_context().get_node_id()
        nodes = _nodes_with_cpus(first=here) if self.settings.placement == "spread" else [here]
        remote = ray.remote(ShardReader)
        # soft affinity: a node that is full or gone is passed over (and a crashed actor
        # may come back elsewhere)
        return [remote.options(max_restarts=self.settings.max_restarts, max_task_retries=0,
                               scheduling_strategy=NodeAffinitySchedulingStrategy(
                                   nodes[i % len(nodes)], soft=True)).remote(
                    self.sources if self.mixed else self.source, self.settings.on_error,
                    self.settings.shuffle_buffer)
                for i in range(self.num_actors)]

    def epoch_samples(self, epoch: int) -> list[Segment]:
        """A mixed stream's samples of `epoch` in epoch order (`pipeline.mix`)."""
        shuffle, seed = self.settings.shuffles(self.split), self.settings.seed
        if self.weights is None:
            return concat_epoch(self.source_shards, shuffle=shuffle, seed=seed, epoch=epoch)
        return mix_epoch(self.source_shards, self.weights, self.num_samples, shuffle=shuffle,
                         seed=seed, epoch=epoch)

    def _plan_at(self, setup: dict, at: Position) -> EpochPlan:
        if not self.mixed:
            return plan_at(self.shards, setup, at)
        return plan_samples(self.epoch_samples(at.epoch), batch_size=setup["batch_size"],
                            num_actors=setup["num_actors"], shuffle=setup["shuffle"],
                            seed=setup["seed"], epoch=at.epoch, rank=setup["rank"],
                            world_size=setup["world_size"], drop_last=setup["drop_last"])

    def _fingerprint(self) -> str:
        """The vocab and shard listing (every source's, with weights and epoch size)."""
        fingerprint = shards_fingerprint(self.vocab.fingerprint, self.shards)
        if self.mixed:
            parts = [shards_fingerprint(self.vocab.fingerprint, s) for s in self.source_shards]
            fingerprint = shards_fingerprint(
                f"{parts}{self.weights}{self.num_samples}", [])
        return fingerprint

    def _setup(self) -> dict:
        """What this rank's plans are a function of (with the epoch), as a state records it."""
        shuffle = self.settings.shuffles(self.split)
        return {"split": self.split, "seed": self.settings.seed, "batch_size": self.batch_size,
                "shards": self._fingerprint(),
                "rank": self.rank, "world_size": self.world_size, "num_actors": self.num_actors,
                "shuffle": shuffle, "shuffle_buffer": self.settings.shuffle_buffer * shuffle,
                "drop_last": self.drop_last}

    def _play(self, at: Position, play: int, item_tfm: Callable, per_call: int
              ) -> Iterator[Batch]:
        plan = self._plan_at(self._setup(), at)
        order = plan.delivery_order()
        done = Counter(actor for actor, _ in order[:at.batches])  # before a loaded state
        self.skips, self.padded = [], 0
        seen: set = set()
        feeds = {t.actor: ActorFeed(self._actors[t.actor], t, item_tfm, self.settings.prefetch,
                                     per_call, self.settings.max_restarts, done[t.actor])
                 for t in plan.tasks if t.num_batches > done[t.actor]}
        for actor, index in order[at.batches:]:
            if play != self._plays:
                raise RuntimeError("a newer iteration of this ShardStream started; its actors "
                                   "serve one epoch at a time, so this one cannot go on")
            data = feeds[actor].take(index)
            for skip in data.skips:
                if skip not in seen:  # a replay after a crash finds the same skips again
                    seen.add(skip)
                    self.skips.append(skip)
                    log.warning("%s", skip)
            self.padded += data.padded
            batch = to_batch(data)
            del data  # the object-store copy is no longer needed
            at.batches += 1  # handed out once yielded
            yield batch
        if play == self._plays and self._now is at:
            self._now = None  # the epoch is over: a state now names the next one
        if self.skips:
            log.warning("epoch %d of %s skipped %d samples in %d places (%d batch slots "
                        "refilled with repeats)", at.epoch, self.source.url, self.skipped,
                        len(self.skips), self.padded)


def _nodes_with_cpus(first: str) -> list[str]:
    """Alive nodes with CPUs, `first` (this process's node) leading, the rest by id.

    Ray's own "SPREAD" strategy left every actor on one node in a test cluster (an actor
    holds no CPU once placed, so each node looks as free as before); dealing the actors
    round-robin over the nodes spreads them for certain.
    """
    others = sorted(n["NodeID"] for n in ray.nodes()
                    if n["Alive"] and n["Resources"].get("CPU", 0) > 0 and n["NodeID"] != first)
    return [first, *others]
