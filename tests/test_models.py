"""Models: shapes, the course's structural choices, init, the factory and the summary."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import (
    ARCHS,
    GeneralRelu,
    ResBlock,
    conv_layer,
    create_model,
    get_cnn_model,
    init_cnn,
    model_summary,
    prev_pow_2,
    xresnet18,
    xresnet50,
)


def test_general_relu_formula():
    x = torch.linspace(-10, 10, 101)
    act = GeneralRelu(leak=0.1, sub=0.4, maxv=6.0)
    expected = (F.leaky_relu(x, 0.1) - 0.4).clamp_max(6.0)
    torch.testing.assert_close(act(x), expected)
    torch.testing.assert_close(GeneralRelu()(x), F.relu(x))


def test_general_relu_sub_is_saved_in_the_state_dict():
    act = GeneralRelu(sub=0.4)
    act.sub.fill_(0.123)
    fresh = GeneralRelu(sub=0.4)
    fresh.load_state_dict(act.state_dict())
    assert float(fresh.sub) == pytest.approx(0.123)


def test_conv_layer_structure():
    with_bn = conv_layer(3, 8)
    assert [type(m) for m in with_bn] == [nn.Conv2d, GeneralRelu, nn.BatchNorm2d]
    assert with_bn[0].bias is None and with_bn[0].stride == (2, 2)
    without_bn = conv_layer(3, 8, ks=5, stride=1, bn=False, leak=0.1)
    assert [type(m) for m in without_bn] == [nn.Conv2d, GeneralRelu]
    assert without_bn[0].bias is not None and without_bn[0].padding == (2, 2)
    assert without_bn(torch.randn(1, 3, 9, 9)).shape == (1, 8, 9, 9)


def test_prev_pow_2():
    assert [prev_pow_2(x) for x in (1, 2, 3, 27, 32, 33)] == [1, 2, 2, 16, 32, 32]


def test_cnn_stem_is_sized_from_input_channels():
    model = get_cnn_model(5, c_in=3, nfs=(32, 64))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 27 input values per 3x3 position -> 16 channels, then x2, x4, then nfs
    assert [c.out_channels for c in convs] == [16, 32, 64, 32, 64]
    assert [c.stride[0] for c in convs] == [1, 2, 2, 2, 2]
    assert get_cnn_model(5, c_in=1).__getitem__(0)[0].out_channels == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("arch", ["cnn", "cnn_nobn", "xresnet10_half", "xresnet18", "xresnet34"])
def test_create_model_forward_backward(arch):
    torch.manual_seed(0)
    model = create_model(arch, n_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    F.cross_entropy(out, torch.tensor([1, 6])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", ["cnn", "xresnet18"])
def test_channels_last_gives_the_same_output(arch):
    torch.manual_seed(0)
    model = create_model(arch, n_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_xresnet50_forward_and_bottleneck():
    model = xresnet50(n_classes=4)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    assert model[-1].in_features == 2048
    block = model[4][0]  # first block of the first stage
    assert isinstance(block, ResBlock)
    assert [seq[0].kernel_size for seq in block.convs] == [(1, 1), (3, 3), (1, 1)]


def test_cnn_nobn_has_no_batchnorm_and_cnn_does():
    assert not any(isinstance(m, nn.BatchNorm2d) for m in create_model("cnn_nobn", 3).modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in create_model("cnn", 3).modules())


def test_xresnet_follows_the_notebook():
    model = xresnet18(n_classes=10, c_in=3)
    stem = [model[i][0] for i in range(3)]
    assert [(c.in_channels, c.out_channels) for c in stem] == [(3, 32), (32, 64), (64, 64)]
    assert stem[0].stride == (2, 2) and stem[1].stride == (1, 1)
    assert isinstance(model[3], nn.MaxPool2d)
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 8
    # expansion 1: two 3x3 convs (the notebook's block, not the exported 1x1 + 3x3)
    assert [seq[0].kernel_size for seq in blocks[0].convs] == [(3, 3), (3, 3)]
    for block in blocks:
        last_bn = block.convs[-1][1]
        assert isinstance(last_bn, nn.BatchNorm2d)
        assert torch.count_nonzero(last_bn.weight) == 0  # zero-init: block starts as identity
        assert len(block.convs[-1]) == 2  # no activation before the sum
    # downsampling block: average-pool then 1x1 conv on the shortcut
    down = model[5][0]
    assert isinstance(down.pool, nn.AvgPool2d)
    assert down.idconv[0].kernel_size == (1, 1) and down.idconv[0].stride == (1, 1)
    assert isinstance(model[4][0].pool, nn.Identity) and isinstance(model[4][0].idconv, nn.Identity)


def test_zero_init_makes_residual_blocks_identity_plus_relu():
    torch.manual_seed(0)
    block = ResBlock(1, 8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(block(x), F.relu(x))


def test_init_cnn_kaiming_and_zero_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 256, 3), nn.BatchNorm2d(256), nn.Linear(512, 300))
    nn.init.constant_(model[1].weight, 0.0)
    init_cnn(model)
    conv, bn, lin = model
    assert conv.bias.abs().sum() == 0 and lin.bias.abs().sum() == 0
    # kaiming normal, fan_in mode, ReLU gain: std = sqrt(2 / fan_in)
    assert float(conv.weight.detach().std()) == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    assert float(lin.weight.detach().std()) == pytest.approx((2 / 512) ** 0.5, rel=0.05)
    assert torch.count_nonzero(bn.weight) == 0  # BatchNorm left alone


def test_create_model_is_deterministic_and_rejects_unknown_names():
    torch.manual_seed(3)
    a = create_model("cnn", 4).state_dict()
    torch.manual_seed(3)
    b = create_model("cnn", 4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="xresnet18"):
        create_model("resnet9000", 4)
    with pytest.raises(ValueError, match="n_classes"):
        create_model("cnn", 0)
    assert set(ARCHS) >= {"cnn", "cnn_nobn", "xresnet18", "xresnet34", "xresnet50"}


def test_model_state_dict_round_trips_with_weights_only_load():
    model = create_model("cnn", 3)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = create_model("cnn", 3)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_model_summary_lists_children_and_leaves_without_side_effects():
    model = create_model("cnn", 10)
    model.train()
    model[1].eval()  # a mixed-mode model must come back exactly as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = model_summary(model, torch.randn(2, 3, 64, 64))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "shape", "params"]
    assert any(line.split()[:3] == ["0", "Sequential", "2x16x64x64"] for line in lines)
    assert any(line.split()[:3] == ["9", "Linear", "2x10"] for line in lines)
    assert lines[-1].startswith("output: 2x10; parameters: ")
    assert len([line for line in lines if line[:1].isdigit()]) == len(list(model.children()))
    # eval mode + no_grad: BN running stats untouched, modes restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model[0].training and not model[1].training
    assert all(h == {} for h in (m._forward_hooks for m in model.modules()))

    leaves = model_summary(model, torch.randn(1, 3, 32, 32), leaves=True)
    assert "0.1    GeneralRelu" in leaves
    assert any(line.split()[:3] == ["6.0", "Conv2d", "1x256x1x1"] for line in leaves.splitlines())


def test_xresnet_width_scales_every_stage():
    half, full = create_model("xresnet10_half", 10), xresnet18(10)
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert max(convs(half)) == 256 and max(convs(full)) == 512
    assert half[-1].in_features == 256
    assert sum(isinstance(m, ResBlock) for m in half.modules()) == 4
