"""`StreamSettings`: how a `ShardStream` batches, orders and moves its data, as one value.

Frozen and checked when made, so a bad value fails at once with the field's name, before
any shard is read or Ray started. What the images look like (size, augmentation) is not
here: the item transform chain owns that (`pipeline.transforms`), and where the process
sits in a data-parallel job (rank, world size, Ray address) is given to the stream itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.remote import RemoteOptions

ON_ERROR = ("fail", "skip")
PLACEMENTS = ("local", "spread")
# Ray's cost per returned object (the raylet's plasma work, the driver's `ray.get`) is what
# limits a stream of small batches, so by default an actor returns as many batches per call
# as make an object of about this size (measured on 2 cores, 64 x 128 px batches: 3,100
# images/s at one 3 MB batch per object, 3,380 at 6 MB, 3,450 at 12 MB; printed by
# `bench/stream_profile.py sweep --batch-sizes 64 --per-call 1 2 4`).
CALL_BYTES = 12 << 20
MAX_BATCHES_PER_CALL = 8


@dataclass(frozen=True)
class StreamSettings:
    """A stream's batching, order, transfer and fault settings.

    - `shuffle`: None for True on "train" (shard order + a `shuffle_buffer` of encoded
      records per actor), False otherwise (the written order, the same every run).
    - `num_actors`: None for the cluster's CPUs // world size.
    - `prefetch`: requests in flight per actor, each for `batches_per_call` batches (one Ray
      object); None for as many as make ~12 MB (at most 8), since Ray's cost is per object.
    - `placement`: "local" puts the actors on this process's node when it has room, so
      batches never cross the network; "spread" deals them round-robin over the nodes.
    - `on_error`: "fail" raises `ShardReadError` naming the shard; "skip" leaves out what
      cannot be read and refills those batch slots with repeats.
    - `max_restarts`: how often Ray may restart a crashed actor (it then replays its task).
    - `read_timeout`, `retries`: how long a remote read waits for bytes (s) and how often a
      broken one is retried, resuming where it broke (`pipeline.remote.RemoteOptions`).
    - `cache_dir`, `cache_limit`: keep remote shards in this local folder, at most this many
      bytes (an int or e.g. "50GB"); None reads them from the network every epoch.
    """

    batch_size: int = 64
    shuffle: bool | None = None
    seed: int = 0
    drop_last: bool = False
    num_actors: int | None = None
    prefetch: int = 2
    batches_per_call: int | None = None
    shuffle_buffer: int = 1000
    placement: str = "local"
    on_error: str = "fail"
    max_restarts: int = 3
    read_timeout: float = RemoteOptions.read_timeout
    retries: int = RemoteOptions.retries
    cache_dir: str | None = None
    cache_limit: int | str = RemoteOptions.cache_limit

    def __post_init__(self) -> None:
        for name, least in (("batch_size", 1), ("num_actors", 1), ("prefetch", 1),
                            ("batches_per_call", 1), ("shuffle_buffer", 0), ("seed", 0),
                            ("max_restarts", 0)):
            value = getattr(self, name)
            if value is None and name in ("num_actors", "batches_per_call"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"StreamSettings: {name} must be an int, got {value!r}")
            if value < least:
                raise ValueError(f"StreamSettings: {name} must be at least {least}, got {value}")
        for name in ("shuffle", "drop_last"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "shuffle" and value is None):
                raise ValueError(f"StreamSettings: {name} must be True or False, got {value!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"StreamSettings: placement must be one of {PLACEMENTS}, "
                             f"got {self.placement!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"StreamSettings: on_error must be one of {ON_ERROR}, "
                             f"got {self.on_error!r}")
        try:
            self.remote()
        except ValueError as e:
            raise ValueError(f"StreamSettings: {e}") from None

    def remote(self) -> RemoteOptions:
        """How the stream's source reads remote shards: timeouts, retries, cache."""
        return RemoteOptions(read_timeout=self.read_timeout, retries=self.retries,
                             cache_dir=self.cache_dir, cache_limit=self.cache_limit)

    def replace(self, **changes) -> StreamSettings:
        """A copy with `changes`; an unknown name is refused with the list of known ones."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise TypeError(f"unknown stream setting(s) {', '.join(unknown)}; "
                            f"StreamSettings has {', '.join(known)}")
        return dataclasses.replace(self, **changes)

    def shuffles(self, split: str) -> bool:
        """Whether `split` is shuffled: as set, else only "train"."""
        return split == "train" if self.shuffle is None else self.shuffle

    def batches_per_call_at(self, size: int) -> int:
        """Batches per actor request for images of `size` x `size`: as set, else ~12 MB."""
        if self.batches_per_call is not None:
            return self.batches_per_call
        batch_bytes = self.batch_size * size * size * 3
        return max(1, min(MAX_BATCHES_PER_CALL, round(CALL_BYTES / batch_bytes)))
