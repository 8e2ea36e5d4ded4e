"""A batch as the stream hands it to the trainer: still uint8, still on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) uint8; float conversion happens on the trainer's device
    labels: torch.Tensor  # (B,) int64
    keys: list  # B sample keys, for tracing a batch back to its shard records

    def __len__(self) -> int:
        return len(self.keys)
