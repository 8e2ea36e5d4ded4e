"""Mid-epoch checkpoints of a data-parallel run (Ray Train), and resuming from one.

Every `checkpoint_every` steps (or `checkpoint_minutes`, rank 0's clock deciding for all)
each rank hands its training stream's state to rank 0 (an all-gather of small JSON dicts)
and the loss/metric sums so far are summed over the ranks; rank 0 writes one checkpoint
holding all of it and reports it to Ray Train. After a worker or node failure every worker
of the new group starts from it: the same world size goes on with exactly the batches the
lost run had left; another world size (`tench fit --resume --num-workers M`) re-plans the
samples no old rank was handed over the new ranks, so the epoch still sees each sample
once (`pipeline.resume`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.callbacks import (
    AvgStatsCallback,
    StepCheckpoint,
    mid_epoch_state,
    resume_position,
    save_checkpoint,
)
from trainer.run_dir import LAST_NAME


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _collective_device() -> torch.device:
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_json(value: Any) -> list:
    """Every rank's JSON-able `value`, by rank (JSON bytes over torch.distributed, no pickle)."""
    dist = _dist()
    if dist is None:
        return [value]
    device = _collective_device()
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([len(data)], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(data)] = data
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[:int(s.item())].cpu().tolist())) for p, s in zip(parts, sizes,
                                                                              strict=True)]


def summed_stats_state(learn) -> dict | None:
    """`AvgStatsCallback.state_dict()` with the training sums and count of all ranks."""
    stats = learn.find_cb(AvgStatsCallback)
    if stats is None:
        return None
    state = stats.state_dict()
    dist = _dist()
    if dist is None:
        return state
    device = _collective_device()
    n_values = 1 + len(stats.metrics)
    sums = state["sums"] if state["sums"] is not None else torch.zeros(n_values)
    packed = torch.cat([sums.float(), torch.tensor([float(state["count"])])]).to(device)
    dist.all_reduce(packed)
    count = int(packed[-1].item())
    return {**state, "sums": packed[:-1].cpu() if count else None, "count": count}


def resume_rank(learn, ckpt: dict, rank: int) -> tuple[int, int]:
    """`resume_position` on one rank: the summed partial stats go to rank 0 only (the
    epoch's all-reduce adds the others' new sums to them)."""
    saved = ckpt.get("callbacks", {}).get(AvgStatsCallback.__name__)
    if rank != 0 and saved is not None:
        callbacks = {**ckpt["callbacks"],
                     AvgStatsCallback.__name__: {**saved, "sums": None, "count": 0}}
        ckpt = {**ckpt, "callbacks": callbacks}
    return resume_position(learn, ckpt)


class RankStepCheckpoint(StepCheckpoint):
    """`StepCheckpoint` on every Ray Train worker: all ranks take part, rank 0 writes
    `RUN_DIR/last.pt` and reports the checkpoint to Ray Train (the others report without)."""

    def __init__(self, config: dict, vocab: Any, run_dir: Path | None, is_main: bool,
                 every: int | None = None, minutes: float | None = None):
        super().__init__(run_dir or ".", config, vocab, every, minutes)
        self.run_dir, self.is_main = run_dir, is_main

    def due(self, learn) -> bool:
        due = super().due(learn)
        dist = _dist()
        if self.minutes is None or dist is None:
            return due  # by steps: the same on every rank
        flag = torch.tensor([float(due)], device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # clocks differ: any rank's is enough
        return bool(flag.item())

    def stream_states(self, learn) -> list[dict]:
        return gather_json(learn.data.train.state_dict())

    def save(self, learn) -> None:
        import ray.train

        streams = self.stream_states(learn)
        stats = summed_stats_state(learn)
        metrics = {"epoch": learn.epoch, "batches": learn.iter + 1}
        if not self.is_main:
            ray.train.report(metrics)
            return
        state = mid_epoch_state(learn, streams, self.config, self.vocab)
        state["model"] = getattr(learn.model, "module", learn.model).state_dict()
        if stats is not None:
            state["callbacks"][AvgStatsCallback.__name__] = stats
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / LAST_NAME, state)
        with tempfile.TemporaryDirectory(prefix="tench-ckpt-") as folder:
            save_checkpoint(Path(folder) / LAST_NAME, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
