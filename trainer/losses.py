"""Label-smoothing cross-entropy and the MixUp arithmetic (course nb_10b).

The mixup functions are plain math on tensors; the MixUp *callback* that calls them on the
device lives with the other callbacks. Randomness comes only from the numpy Generator the
caller passes in, so a run is reproducible and its RNG state can be checkpointed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_REDUCTIONS = ("mean", "sum", "none")


def reduce_loss(loss: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Apply a torch-style reduction ('mean' | 'sum' | 'none') to per-sample losses."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy against targets smoothed towards uniform by `eps`.

    loss = eps * mean_over_batch(-sum_c log p_c) / C + (1 - eps) * NLL, which equals
    `F.cross_entropy(..., label_smoothing=eps)`; written out as in the course so the
    formula is visible.
    """

    def __init__(self, eps: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"label smoothing eps must be in [0, 1), got {eps}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.eps = eps
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n_classes = output.size(-1)
        log_preds = F.log_softmax(output, dim=-1)  # (B, C); autocast runs this in fp32
        smooth = reduce_loss(-log_preds.sum(dim=-1), self.reduction)
        nll = F.nll_loss(log_preds, target, reduction=self.reduction)
        return self.eps * smooth / n_classes + (1 - self.eps) * nll

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}"


def unreduced(loss_func: Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A version of `loss_func` that returns one loss per sample, leaving `loss_func` as is.

    Works for loss modules with a `reduction` attribute (nn.CrossEntropyLoss,
    LabelSmoothingCrossEntropy: a shallow copy gets reduction='none', instead of the
    course's NoneReduce which mutated the original) and for functions that take a
    `reduction=` keyword (F.cross_entropy).
    """
    if isinstance(loss_func, nn.Module):
        if not hasattr(loss_func, "reduction"):
            raise TypeError(
                f"{type(loss_func).__name__} has no `reduction` attribute, so mixup cannot "
                "get per-sample losses from it"
            )
        per_sample = copy.copy(loss_func)
        per_sample.reduction = "none"
        return per_sample

    def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_func(pred, target, reduction="none")

    return per_sample_loss


def mixup_batch(
    x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner from the same batch.

    lam ~ Beta(alpha, alpha) per sample, then lam = max(lam, 1 - lam) so every mixed image
    stays closer to its own label y than to y_perm. Returns (x_mixed, y, y_perm, lam) with
    x_mixed = lam * x + (1 - lam) * x[perm]; lam has shape (B,), float32, on x's device.
    `x` is not modified.
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"mixup needs a float image batch (normalised on the device), got {x.dtype}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"mixup got {x.shape[0]} images but {y.shape[0]} labels")
    batch_size = x.shape[0]
    lam = rng.beta(alpha, alpha, size=batch_size)
    lam = np.maximum(lam, 1.0 - lam).astype(np.float32)
    perm = torch.from_numpy(rng.permutation(batch_size)).to(x.device)
    lam_t = torch.from_numpy(lam).to(x.device)
    lam_x = lam_t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
    x_mixed = torch.lerp(x[perm], x, lam_x)  # = lam * x + (1 - lam) * x[perm]
    return x_mixed, y, y[perm], lam_t


def mix_loss(
    loss_func: Callable,
    pred: torch.Tensor,
    y: torch.Tensor,
    y_perm: torch.Tensor,
    lam: torch.Tensor,
    reduction: str | None = None,
) -> torch.Tensor:
    """lam * L(pred, y) + (1 - lam) * L(pred, y_perm) per sample, then reduced.

    `reduction` defaults to `loss_func`'s own (or 'mean' for a plain function), as in the
    course; `loss_func` itself is never modified.
    """
    if reduction is None:
        reduction = getattr(loss_func, "reduction", "mean")
    per_sample = unreduced(loss_func)
    loss_a = per_sample(pred, y)
    loss_b = per_sample(pred, y_perm)
    if loss_a.shape != lam.shape:
        raise ValueError(
            f"per-sample loss has shape {tuple(loss_a.shape)} but lam has {tuple(lam.shape)}; "
            "the loss function must return one value per sample with reduction='none'"
        )
    lam = lam.to(loss_a.dtype)
    return reduce_loss(torch.lerp(loss_b, loss_a, lam), reduction)
