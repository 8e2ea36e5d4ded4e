"""Label smoothing against torch's own implementation; mixup math on real tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.losses import (
    LabelSmoothingCrossEntropy,
    mix_loss,
    mixup_batch,
    reduce_loss,
    unreduced,
)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_matches_torch(eps, reduction):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 7, (16,), generator=gen)
    ours = LabelSmoothingCrossEntropy(eps, reduction)(logits, target)
    oracle = F.cross_entropy(logits, target, label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(ours, oracle)


def test_label_smoothing_gradients_match_torch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, generator=gen, requires_grad=True)
    target = torch.randint(0, 5, (8,), generator=gen)
    LabelSmoothingCrossEntropy(0.2)(logits, target).backward()
    ours = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits, target, label_smoothing=0.2).backward()
    torch.testing.assert_close(ours, logits.grad)


def test_label_smoothing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        LabelSmoothingCrossEntropy(1.0)
    with pytest.raises(ValueError, match="reduction"):
        LabelSmoothingCrossEntropy(0.1, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        reduce_loss(torch.ones(3), "avg")


def _batch(seed: int = 0, batch_size: int = 12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (batch_size,), generator=gen)
    return x, y


def test_mixup_batch_mixes_with_a_permutation_and_lam_at_least_half():
    x, y = _batch()
    x_before = x.clone()
    x_mixed, y_out, y_perm, lam = mixup_batch(x, y, alpha=0.4, rng=np.random.default_rng(3))
    assert torch.equal(x, x_before)  # input untouched
    assert y_out is y
    assert lam.shape == (12,) and lam.dtype == torch.float32
    assert bool(((lam >= 0.5) & (lam <= 1.0)).all())
    # Recover the permutation from the labels' partner: each mixed image must equal the
    # formula for *some* partner j with y[j] == y_perm[i].
    for i in range(len(x)):
        candidates = [
            j
            for j in range(len(x))
            if y[j] == y_perm[i]
            and torch.allclose(x_mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[j], atol=1e-6)
        ]
        assert candidates, f"sample {i} is not lam*x[i] + (1-lam)*x[j] for any partner"
    assert sorted(y_perm.tolist()) == sorted(y.tolist())  # a permutation of the labels
    assert not torch.allclose(x_mixed, x)  # something was really mixed


def test_mixup_batch_is_reproducible_from_the_generator():
    x, y = _batch()
    a = mixup_batch(x, y, 0.4, np.random.default_rng(7))
    b = mixup_batch(x, y, 0.4, np.random.default_rng(7))
    c = mixup_batch(x, y, 0.4, np.random.default_rng(8))
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta, tb)
    assert not torch.equal(a[3], c[3])


def test_mixup_lambda_distribution_is_folded_beta():
    # Beta(1, 1) is uniform, so max(lam, 1 - lam) is uniform on [0.5, 1]: mean 0.75.
    x = torch.zeros(20000, 1)
    y = torch.zeros(20000, dtype=torch.long)
    _, _, _, lam = mixup_batch(x, y, alpha=1.0, rng=np.random.default_rng(0))
    assert float(lam.mean()) == pytest.approx(0.75, abs=0.01)
    assert float(lam.min()) >= 0.5
    # Small alpha puts most mass near the ends of Beta, i.e. lam near 1 after folding.
    _, _, _, lam_small = mixup_batch(x, y, alpha=0.1, rng=np.random.default_rng(0))
    assert float(lam_small.mean()) > 0.9


def test_mixup_batch_rejects_bad_input():
    x, y = _batch()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="alpha"):
        mixup_batch(x, y, 0.0, rng)
    with pytest.raises(TypeError, match="float"):
        mixup_batch(x.to(torch.uint8), y, 0.4, rng)
    with pytest.raises(ValueError, match="labels"):
        mixup_batch(x, y[:-1], 0.4, rng)


@pytest.mark.parametrize(
    "loss_func",
    [F.cross_entropy, nn.CrossEntropyLoss(), LabelSmoothingCrossEntropy(0.1)],
    ids=["function", "torch-module", "label-smoothing"],
)
def test_mix_loss_matches_manual_formula(loss_func):
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(10, 4, generator=gen)
    y = torch.randint(0, 4, (10,), generator=gen)
    y_perm = y[torch.randperm(10, generator=gen)]
    lam = torch.rand(10, generator=gen) / 2 + 0.5
    smoothing = getattr(loss_func, "eps", 0.0)
    per_a = F.cross_entropy(pred, y, reduction="none", label_smoothing=smoothing)
    per_b = F.cross_entropy(pred, y_perm, reduction="none", label_smoothing=smoothing)
    expected = (lam * per_a + (1 - lam) * per_b).mean()
    torch.testing.assert_close(mix_loss(loss_func, pred, y, y_perm, lam), expected)
    torch.testing.assert_close(
        mix_loss(loss_func, pred, y, y_perm, lam, reduction="sum"), expected * 10
    )
    if isinstance(loss_func, nn.Module):
        assert loss_func.reduction == "mean"  # not mutated (the course's NoneReduce did)
        assert loss_func(pred, y).dim() == 0


def test_mix_loss_with_lam_one_is_the_plain_loss_and_backpropagates():
    gen = torch.Generator().manual_seed(4)
    pred = torch.randn(6, 3, generator=gen, requires_grad=True)
    y = torch.randint(0, 3, (6,), generator=gen)
    loss = mix_loss(F.cross_entropy, pred, y, y.flip(0), torch.ones(6))
    torch.testing.assert_close(loss, F.cross_entropy(pred, y))
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_unreduced_needs_a_reduction_attribute_and_per_sample_shape():
    with pytest.raises(TypeError, match="reduction"):
        unreduced(nn.Linear(2, 2))
    pred = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    assert unreduced(F.cross_entropy)(pred, y).shape == (4,)
    with pytest.raises(ValueError, match="one value per sample"):
        mix_loss(F.cross_entropy, pred, y, y, torch.ones(3))


def test_mixup_end_to_end_on_a_real_model_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x, y = _batch(5, batch_size=16)
    x_mixed, y, y_perm, lam = mixup_batch(x, y, 0.4, np.random.default_rng(0))
    loss = mix_loss(LabelSmoothingCrossEntropy(), model(x_mixed), y, y_perm, lam)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
