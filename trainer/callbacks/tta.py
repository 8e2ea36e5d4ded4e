"""Test-time augmentation: the final validation again, each image seen as is and mirrored.

Averaging the class probabilities of the centre crop and of its horizontal flip smooths
out a model's left-right quirks for the price of one more validation pass; it usually adds
a little accuracy and never changes the saved model. The flip is done on the device, on the
very batch the validation stream delivered, so both views are exactly the same pixels.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from trainer.callbacks.core import Callback
from trainer.callbacks.device import DeviceCallback, NormalizeCallback, model_device
from trainer.callbacks.precision import MixedPrecision


def tta_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean softmax of `images` (a float (B, C, H, W) batch) and of their left-right flip."""
    probs = model(images).float().softmax(dim=1)
    return probs.add_(model(images.flip(3)).float().softmax(dim=1)).div_(2)


class TestTimeAugmentation(Callback):
    """After the last epoch: one more pass over the validation stream with TTA.

    Adds `accuracy_tta` to that epoch's row of `learn.history` (so metrics.json and last.pt
    have it). Runs after the progress table has printed the row (whose columns are fixed by
    the first epoch) and before the metrics files and checkpoint are written. Data-parallel:
    each rank counts its part and the counts are summed over ranks.
    """

    order = 62
    __test__ = False  # not a pytest test class, despite the name

    def after_epoch(self, learn) -> None:
        last = learn.history[-1] if learn.history else None
        if (learn.epoch != learn.n_epochs - 1 or learn.data.valid is None
                or last is None or last.get("epoch") != learn.epoch):
            return
        was_training = learn.model.training
        learn.model.eval()
        try:
            correct, count = self.count_correct(learn)
        finally:
            learn.model.train(was_training)
        last["accuracy_tta"] = correct / count if count else None

    def count_correct(self, learn) -> tuple[int, int]:
        placed = learn.find_cb(DeviceCallback)
        device = placed.device if placed is not None else model_device(learn.model)
        memory_format = placed.memory_format if placed is not None else torch.preserve_format
        norm = learn.find_cb(NormalizeCallback)
        precision = learn.find_cb(MixedPrecision)
        autocast = (torch.autocast(device.type, dtype=precision.dtype)
                    if precision is not None and precision.active else contextlib.nullcontext())
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # correct, count
        with torch.no_grad():
            for batch in learn.data.valid:
                images = batch.images.to(device, non_blocking=device.type == "cuda")
                if images.dim() == 4:
                    images = images.contiguous(memory_format=memory_format)
                images = norm.normalize(images) if norm is not None else images.float()
                labels = batch.labels.to(device)
                with autocast:
                    probs = tta_probabilities(learn.model, images)
                totals[0] += (probs.argmax(dim=1) == labels).sum()
                totals[1] += labels.shape[0]
        _sum_over_ranks(totals)
        correct, count = totals.tolist()  # the one device -> host sync of the pass
        return int(correct), int(count)


def _sum_over_ranks(totals: torch.Tensor) -> None:
    """All-reduce (sum) in a data-parallel run; nothing in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
