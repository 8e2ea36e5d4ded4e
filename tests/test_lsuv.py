"""LSUV on real models with a real batch: unit statistics, termination, no side effects."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from trainer.lsuv import lsuv_init
from trainer.models import GeneralRelu, create_model

TOL = 1e-3


def _image_batch(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random uint8 images, normalised the way the trainer's batch transform does."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    mean = torch.tensor([0.47, 0.48, 0.45]).view(1, 3, 1, 1)
    std = torch.tensor([0.29, 0.28, 0.30]).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _probe_stats(model: nn.Module, batch: torch.Tensor) -> list[tuple[float, float]]:
    """Mean/std of every GeneralRelu output and of the final Linear, measured independently."""
    probes = [m for m in model.modules() if isinstance(m, (GeneralRelu, nn.Linear))]
    stats: dict[nn.Module, tuple[float, float]] = {}

    def hook(module, _inputs, output):
        stats[module] = (output.mean().item(), output.std().item())

    handles = [p.register_forward_hook(hook) for p in probes]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(batch)
    model.train(was_training)
    for h in handles:
        h.remove()
    return [stats[p] for p in probes]


@pytest.mark.parametrize("arch", ["cnn", "cnn_nobn"])
def test_lsuv_gives_unit_statistics_on_the_course_cnn(arch):
    torch.manual_seed(0)
    model = create_model(arch, n_classes=10)
    batch = _image_batch()
    before = _probe_stats(model, batch)
    assert any(abs(m) > 0.05 or abs(s - 1) > 0.05 for m, s in before)  # not already unit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer must converge: no warning
        results = lsuv_init(model, batch, tol=TOL)
    after = _probe_stats(model, batch)
    assert len(after) == 8 == len(results)  # 7 conv layers + the head
    for (mean, std), res in zip(after, results, strict=True):
        assert abs(mean) < TOL and abs(std - 1) < TOL, (res.name, mean, std)
        assert res.mean == pytest.approx(mean, abs=1e-5)
        assert res.std == pytest.approx(std, abs=1e-5)
    assert [r.name for r in results] == [f"{i}.0" for i in range(7)] + ["9"]


def test_lsuv_leaves_no_side_effects():
    torch.manual_seed(1)
    model = create_model("cnn", n_classes=5)
    model.train()
    model[2].eval()
    buffers_before = {name: b.clone() for name, b in model.named_buffers() if "running" in name}
    lsuv_init(model, _image_batch())
    assert model.training and model[0].training and not model[2].training
    for name, b in model.named_buffers():
        if name in buffers_before:
            assert torch.equal(b, buffers_before[name]), f"{name} changed"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_lsuv_adjustments_survive_a_state_dict_round_trip():
    torch.manual_seed(2)
    model = create_model("cnn_nobn", n_classes=4)
    batch = _image_batch(8)
    lsuv_init(model, batch)
    subs = [float(m.sub) for m in model.modules() if isinstance(m, GeneralRelu)]
    assert any(abs(s - 0.4) > 1e-3 for s in subs)  # LSUV moved the activation's sub
    fresh = create_model("cnn_nobn", n_classes=4)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(batch), model.eval()(batch))


def test_lsuv_terminates_on_a_degenerate_layer_without_nan():
    torch.manual_seed(3)
    model = create_model("cnn_nobn", n_classes=10)
    dead = model[2][0]
    with torch.no_grad():
        dead.weight.zero_()
        dead.bias.zero_()
    passes = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    max_iters = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = lsuv_init(model, _image_batch(8), max_iters=max_iters)
    messages = [str(w.message) for w in caught]
    # the dead layer is named; everything after it only sees zeros and is reported too
    assert any("'2.0' stopped at" in m and "std=0" in m for m in messages), messages
    assert not any("'1.0'" in m for m in messages)
    assert len(passes) <= len(results) * (max_iters + 1)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    dead_stats = next(r for r in results if r.name == "2.0")
    assert dead_stats.std == 0.0 and abs(dead_stats.mean) < TOL  # the mean was still fixed
    assert torch.isfinite(model.eval()(_image_batch(2))).all()


def test_lsuv_iteration_cap_bounds_the_work():
    torch.manual_seed(4)
    model = create_model("cnn", n_classes=10)
    passes = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = lsuv_init(model, _image_batch(8), tol=1e-12, max_iters=2)
    assert len(passes) <= len(results) * 3  # one measure + at most 2 adjust-and-measure


def test_lsuv_on_xresnet_sets_std_and_keeps_zero_init_bn():
    torch.manual_seed(5)
    model = create_model("xresnet18", n_classes=10)
    zero_bns = [block.convs[-1][1] for block in model.modules() if hasattr(block, "convs")]
    results = lsuv_init(model, _image_batch(8))
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(results) == len(convs)  # every conv, shortcut conv and the head
    for res in results:
        assert abs(res.std - 1) < TOL, res
    head = results[-1]
    assert abs(head.mean) < TOL  # the head has a bias, so its mean is set too
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in zero_bns)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_lsuv_rejects_integer_images():
    model = create_model("cnn_nobn", n_classes=2)
    with pytest.raises(TypeError, match="float"):
        lsuv_init(model, torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="max_iters"):
        lsuv_init(model, torch.zeros(2, 3, 8, 8), max_iters=0)


def test_lsuv_skips_a_layer_the_forward_never_uses():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.spare = nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = WithSpare()
    with pytest.warns(UserWarning, match="'spare'.*not used"):
        results = lsuv_init(model, torch.randn(32, 4))
    assert [r.name for r in results] == ["used"]
    assert abs(results[0].std - 1) < TOL and abs(results[0].mean) < TOL
