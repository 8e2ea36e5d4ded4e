"""Tiny real training problems for the Learner and callback tests (no mocks: real batches,
real models, real gradient steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.batch import Batch

MEAN = [0.3, 0.3, 0.3]
STD = [0.25, 0.25, 0.25]


def make_batches(n_batches: int, bs: int = 16, seed: int = 0, size: int = 8,
                 n_classes: int = 3, sizes: list[int] | None = None) -> list[Batch]:
    """uint8 images whose class is the brightest channel: easy, but it has to be learnt."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        b = sizes[i] if sizes is not None else bs
        labels = torch.randint(0, n_classes, (b,), generator=gen)
        images = torch.randint(0, 120, (b, 3, size, size), generator=gen)
        images[torch.arange(b), labels % 3] += 100
        keys = [f"s{seed}-{i}-{j}" for j in range(b)]
        batches.append(Batch(images.to(torch.uint8), labels, keys))
    return batches


def float_batches(batches: list[Batch]) -> list[Batch]:
    """The same batches already as floats (for learners without NormalizeCallback)."""
    return [Batch(b.images.float() / 255, b.labels, b.keys) for b in batches]


def tiny_cnn(n_classes: int = 3, seed: int = 0) -> nn.Module:
    """Conv + BatchNorm + ReLU + pool + linear: BN running stats are part of the state."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, n_classes),
    )


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def state_equal(a: dict, b: dict) -> bool:
    """Bit-identical state dicts (same keys, exactly equal tensors)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; with several, every op pays an OpenMP
    hand-off that dominates (and crawls when other test processes share the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
