"""The driver's side of the stream actors: requests kept in flight, replay after a crash.

`pipeline.stream.ShardStream` makes one `ActorFeed` per actor per epoch and turns what
arrives into `Batch`es with `to_batch`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError

from pipeline.actors import BatchData, StaleRequest
from pipeline.batch import Batch
from pipeline.plan import ActorTask
from pipeline.source import ShardReadError

log = logging.getLogger(__name__)

RESTART_WAIT_S = 60.0  # how long to wait for Ray to bring a crashed actor back


def to_batch(data: BatchData) -> Batch:
    """(B, H, W, 3) read-only numpy -> a `Batch` with a fresh (B, 3, H, W) uint8 tensor.

    One plain copy (0.1 ms for 64 x 128 px) releases the object-store slot and gives the
    trainer memory it may write to. The tensor is (B, 3, H, W) in channels-last memory
    (a permuted view of the HWC copy), the layout the trainer's convolutions want anyway;
    a transposing copy to contiguous NCHW cost 10x more (both: `bench/kernel_bench.py`).
    """
    images = torch.from_numpy(data.images.copy()).permute(0, 3, 1, 2)
    return Batch(images, torch.tensor(data.labels, dtype=torch.int64), list(data.keys))


class ActorFeed:
    """The driver's side of one actor for one epoch: requests in flight, replay after a crash."""

    def __init__(self, actor, task: ActorTask, item_tfm: Callable, prefetch: int,
                 per_call: int, max_restarts: int, first_batch: int = 0):
        self.actor, self.task, self.item_tfm = actor, task, item_tfm
        self.prefetch, self.per_call, self.restarts_left = prefetch, per_call, max_restarts
        self.start(first_batch)

    def start(self, first_batch: int) -> None:
        self.token = uuid.uuid4().hex
        # the chain travels once per task (epoch or replay), not with every request
        self.started = self.actor.start.remote(self.task, self.item_tfm, self.token,
                                               first_batch)
        self.refs: deque = deque()  # requests in flight, in task order
        self.ready: deque[BatchData] = deque()  # received, not yet handed out
        self.first, self.requested = first_batch, first_batch
        self.fill()

    def fill(self) -> None:
        while len(self.refs) < self.prefetch and self.requested < self.task.num_batches:
            # the first request is for one batch, so the first batch comes without waiting
            # for a whole call's worth
            count = 1 if self.requested == self.first else self.per_call
            count = min(count, self.task.num_batches - self.requested)
            self.refs.append(self.actor.next_batches.remote(self.token, count))
            self.requested += count

    def take(self, index: int) -> BatchData:
        """Batch `index` of this actor's task (the driver takes them in order)."""
        while not self.ready:  # `index` is the first batch not received
            ref = self.refs.popleft()
            try:
                self.ready.extend(ray.get(ref))
            except (ActorUnavailableError, ActorDiedError, StaleRequest) as e:
                # StaleRequest: a request that reached the restarted actor before our replay
                self.recover(index, e)
                continue
            except ShardReadError as e:  # raised in the actor: re-raise the plain error
                raise ShardReadError(e.shard, e.reason) from None
            self.fill()  # ask for more before handing these out
        return self.ready.popleft()

    def recover(self, index: int, error: Exception) -> None:
        """Wait for Ray to restart the actor, then replay the task from batch `index`."""
        if self.restarts_left <= 0:
            raise RuntimeError(f"stream actor {self.task.actor} died and its restarts are used "
                               f"up (max_restarts); last error: {error}") from error
        self.restarts_left -= 1
        log.warning("stream actor %d died at batch %d; resuming it", self.task.actor, index)
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            self.start(index)
            try:
                ray.get(self.started)
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            except ActorDiedError as e:
                raise RuntimeError(f"stream actor {self.task.actor} died and Ray could not "
                                   f"restart it: {e}") from e
