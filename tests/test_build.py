"""`trainer.build`: the pieces both entries assemble a run from, on recorded batches (no Ray).

The normalisation oracle is torchvision's `normalize` on `x / 255`: the Learner's callback,
LSUV's first batch and `tench predict` all go through `callbacks.device.Normalize`.
"""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from shards.vocab import Vocab
from tests.tiny_training import MEAN, STD, make_batches
from trainer import optim
from trainer.build import first_float_batch, make_learner, make_opt_func, schedule_callbacks
from trainer.callbacks import Normalize, NormalizeCallback, ParamScheduler
from trainer.config import FitConfig
from trainer.learner import DataPair


class RecordedStream:
    """Batches replayed every epoch, with the attributes `make_learner` reads."""

    def __init__(self, batches, vocab: Vocab, stats: dict):
        self.batches, self.vocab, self.stats = batches, vocab, stats

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def oracle(images: torch.Tensor) -> torch.Tensor:
    return TF.normalize(images.float() / 255, MEAN, STD)


def test_lsuvs_first_batch_is_normalised_as_training_is():
    batches = make_batches(2, bs=4, size=16)
    stream = RecordedStream(batches, Vocab(["a", "b", "c"]), {"mean": MEAN, "std": STD})
    config = FitConfig(arch="cnn", size=16, device="cpu")
    learn = make_learner(config, DataPair(stream, None), None, is_main=False)
    x = first_float_batch(learn)
    torch.testing.assert_close(x, oracle(batches[0].images), rtol=1e-6, atol=1e-6)
    callback = learn.find_cb(NormalizeCallback)
    torch.testing.assert_close(callback.normalize(batches[0].images), x, rtol=0, atol=0)


def test_normalize_keeps_channels_last_and_refuses_floats():
    images = make_batches(1, bs=2, size=8)[0].images.contiguous(memory_format=torch.channels_last)
    out = Normalize(MEAN, STD)(images)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, oracle(images), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):  # floats would be normalised twice
        Normalize(MEAN, STD)(images.float())


def test_sgd_keeps_a_momentum_the_one_cycle_schedule_drives():
    config = FitConfig(opt="sgd", lr=0.1)
    opt = make_opt_func(config)([torch.nn.Parameter(torch.zeros(2))], 0.1)
    assert isinstance(opt, optim.Optimizer) and opt.param_groups[0]["mom"] > 0
    [scheduler] = schedule_callbacks(config)
    assert isinstance(scheduler, ParamScheduler) and set(scheduler.scheds) == {"lr", "mom"}
