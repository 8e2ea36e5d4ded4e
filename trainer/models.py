"""The course's models (the plain CNN of nb_07/nb_08, the XResNets of nb_11) and torchvision's
ResNets, so a torchvision weights file can be fine-tuned.

Nothing here touches a device: models are built on the CPU and the device callback moves
them. `create_model(arch, n_classes)` is what `tench fit --arch` calls; `head_name`,
`layer_groups` and `freeze_body` split any of them into body and head for fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as torchvision_resnet


class GeneralRelu(nn.Module):
    """(Leaky) ReLU, then subtract `sub`, then clamp at `maxv` (course nb_06).

    `sub` is a buffer, not a plain attribute: LSUV adjusts it, and a buffer is saved in
    the state_dict so the adjusted value survives a checkpoint.
    """

    def __init__(self, leak: float | None = None, sub: float = 0.0, maxv: float | None = None):
        super().__init__()
        self.leak = leak
        self.maxv = maxv
        self.register_buffer("sub", torch.tensor(float(sub)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(x, self.leak) if self.leak else F.relu(x)
        x = x - self.sub.to(x.dtype)
        return x.clamp_max(self.maxv) if self.maxv is not None else x

    def extra_repr(self) -> str:
        return f"leak={self.leak}, sub={float(self.sub):.4g}, maxv={self.maxv}"


def conv_layer(
    ni: int, nf: int, ks: int = 3, stride: int = 2, bn: bool = True, **act_kwargs
) -> nn.Sequential:
    """Conv -> GeneralRelu -> BatchNorm (course nb_07). The conv has no bias when BN follows."""
    layers = [
        nn.Conv2d(ni, nf, ks, padding=ks // 2, stride=stride, bias=not bn),
        GeneralRelu(**act_kwargs),
    ]
    if bn:
        layers.append(nn.BatchNorm2d(nf, eps=1e-5, momentum=0.1))
    return nn.Sequential(*layers)


def prev_pow_2(x: int) -> int:
    """The largest power of two <= x (sizes the stem from the input channels)."""
    return 2 ** math.floor(math.log2(x))


# The GeneralRelu settings the course's CNN notebooks train with (nb_06, nb_07).
CNN_ACTIVATION = {"leak": 0.1, "sub": 0.4, "maxv": 6.0}


def get_cnn_layers(
    n_classes: int,
    c_in: int = 3,
    nfs: Sequence[int] = (32, 64, 128, 256),
    bn: bool = True,
    **act_kwargs,
) -> list[nn.Module]:
    """Stem of three 3x3 convs (c_in -> l -> 2l -> 4l, l = prev_pow_2(9 * c_in)), then one
    stride-2 conv_layer per entry of `nfs`, then average pool, flatten and a linear head."""
    act = {**CNN_ACTIVATION, **act_kwargs}
    stem_width = prev_pow_2(c_in * 3 * 3)
    layers: list[nn.Module] = [
        conv_layer(c_in, stem_width, stride=1, bn=bn, **act),
        conv_layer(stem_width, stem_width * 2, stride=2, bn=bn, **act),
        conv_layer(stem_width * 2, stem_width * 4, stride=2, bn=bn, **act),
    ]
    widths = [stem_width * 4, *nfs]
    layers += [conv_layer(widths[i], widths[i + 1], bn=bn, **act) for i in range(len(nfs))]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], n_classes)]
    return layers


def get_cnn_model(
    n_classes: int,
    c_in: int = 3,
    nfs: Sequence[int] = (32, 64, 128, 256),
    bn: bool = True,
    **act_kwargs,
) -> nn.Sequential:
    return nn.Sequential(*get_cnn_layers(n_classes, c_in, nfs, bn, **act_kwargs))


def init_cnn(model: nn.Module, leak: float = 0.0) -> nn.Module:
    """Kaiming-normal weights and zero biases for every conv and linear layer.

    BatchNorm is left alone, so the XResNet's zero-initialised last BN in each block stays
    zero. `leak` is the negative slope the kaiming gain assumes (0 for ReLU).
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, a=leak)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


# --- XResNet (nb_11, "Bag of Tricks" ResNet-D) -------------------------------------------


def conv_bn(
    ni: int, nf: int, ks: int = 3, stride: int = 1, zero_bn: bool = False, act: bool = True
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU, the XResNet's unit (nb_11's `conv_layer`).

    zero_bn starts the BN's scale at 0 so a residual block begins as the identity.
    """
    norm = nn.BatchNorm2d(nf)
    nn.init.constant_(norm.weight, 0.0 if zero_bn else 1.0)
    layers = [nn.Conv2d(ni, nf, ks, stride=stride, padding=ks // 2, bias=False), norm]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Residual block as in the nb_11 *notebook*: two 3x3 convs when expansion is 1, else
    1x1 -> 3x3 -> 1x1 bottleneck. The shortcut average-pools (when strided) before its 1x1
    conv (when the width changes) instead of striding a 1x1 conv and dropping 3/4 of the input.
    """

    def __init__(self, expansion: int, ni: int, nh: int, stride: int = 1):
        super().__init__()
        nf, ni = nh * expansion, ni * expansion
        if expansion == 1:
            layers = [
                conv_bn(ni, nh, 3, stride=stride),
                conv_bn(nh, nf, 3, zero_bn=True, act=False),
            ]
        else:
            layers = [
                conv_bn(ni, nh, 1),
                conv_bn(nh, nh, 3, stride=stride),
                conv_bn(nh, nf, 1, zero_bn=True, act=False),
            ]
        self.convs = nn.Sequential(*layers)
        self.idconv = nn.Identity() if ni == nf else conv_bn(ni, nf, 1, act=False)
        self.pool = nn.Identity() if stride == 1 else nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.convs(x) + self.idconv(self.pool(x)))


def xresnet(
    expansion: int, layers: Sequence[int], n_classes: int, c_in: int = 3, width: float = 1.0
) -> nn.Sequential:
    """Stem of three 3x3 convs [c_in, (c_in+1)*8, 64, 64], max pool, four stages of
    ResBlocks with widths 64, 128, 256, 512 (times `expansion`), pool, flatten, linear.

    `width` scales the 64..512 widths (0.5: 32..256, a quarter of the compute).
    """
    base = [round(w * width) for w in (64, 128, 256, 512)]
    stem_widths = [c_in, (c_in + 1) * 8, base[0], base[0]]
    stem = [
        conv_bn(stem_widths[i], stem_widths[i + 1], stride=2 if i == 0 else 1) for i in range(3)
    ]
    widths = [base[0] // expansion, *base]
    stages = [
        nn.Sequential(
            *[
                ResBlock(
                    expansion,
                    widths[i] if j == 0 else widths[i + 1],
                    widths[i + 1],
                    stride=(1 if i == 0 else 2) if j == 0 else 1,
                )
                for j in range(n_blocks)
            ]
        )
        for i, n_blocks in enumerate(layers)
    ]
    model = nn.Sequential(
        *stem,
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[-1] * expansion, n_classes),
    )
    return init_cnn(model)


def xresnet18(n_classes: int, c_in: int = 3) -> nn.Sequential:
    return xresnet(1, [2, 2, 2, 2], n_classes, c_in)


def xresnet10_half(n_classes: int, c_in: int = 3) -> nn.Sequential:
    """One block per stage at half the widths (32..256): small pictures of few classes
    (the demo's shapes at 64 px) learn far faster than with the plain `cnn` for ~4x its cost."""
    return xresnet(1, [1, 1, 1, 1], n_classes, c_in, width=0.5)


def xresnet34(n_classes: int, c_in: int = 3) -> nn.Sequential:
    return xresnet(1, [3, 4, 6, 3], n_classes, c_in)


def xresnet50(n_classes: int, c_in: int = 3) -> nn.Sequential:
    return xresnet(4, [3, 4, 6, 3], n_classes, c_in)


# --- factory ----------------------------------------------------------------------------

ARCHS = ("cnn", "cnn_nobn", "xresnet10_half", "xresnet18", "xresnet34", "xresnet50",
         "resnet18", "resnet34", "resnet50")
# torchvision's builders, always without weights: tench downloads nothing; a weights file is
# loaded with `tench fit --init PATH`.
TORCHVISION_RESNETS = {"resnet18": torchvision_resnet.resnet18,
                       "resnet34": torchvision_resnet.resnet34,
                       "resnet50": torchvision_resnet.resnet50}


def create_model(arch: str, n_classes: int, c_in: int = 3) -> nn.Module:
    """Build and initialise a model by name (the CLI's `--arch`), on the CPU.

    `cnn_nobn` is the course CNN without BatchNorm: no running statistics, so its output
    depends only on the weights and the batch (handy for data-parallel equivalence tests).
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if arch == "cnn":
        return init_cnn(get_cnn_model(n_classes, c_in), leak=CNN_ACTIVATION["leak"])
    if arch == "cnn_nobn":
        return init_cnn(get_cnn_model(n_classes, c_in, bn=False), leak=CNN_ACTIVATION["leak"])
    if arch == "xresnet10_half":
        return xresnet10_half(n_classes, c_in)
    if arch == "xresnet18":
        return xresnet18(n_classes, c_in)
    if arch == "xresnet34":
        return xresnet34(n_classes, c_in)
    if arch == "xresnet50":
        return xresnet50(n_classes, c_in)
    if arch in TORCHVISION_RESNETS:
        if c_in != 3:
            raise ValueError(f"{arch} (torchvision) takes 3 input channels, got {c_in}")
        return TORCHVISION_RESNETS[arch](weights=None, num_classes=n_classes)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


# --- body and head (fine-tuning) ---------------------------------------------------------

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
N_LAYER_GROUPS = 3  # what layer_groups returns


def head_name(model: nn.Module) -> str:
    """The name of the model's classifier in its state_dict: torchvision's `fc`, the last
    Linear of a Sequential (the CNN, the XResNets)."""
    if isinstance(model, torchvision_resnet.ResNet):
        return "fc"
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return str(len(model) - 1)
    raise ValueError(f"no classifier head found in a {type(model).__name__}: tench knows "
                     "torchvision ResNets and Sequentials ending in a Linear layer")


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Three parameter groups for discriminative learning rates, as fastai splits a ResNet:
    the early body, the body's last two blocks (children with parameters), the head.

    Every parameter is in a group, trainable or not, so unfreezing needs no new optimizer.
    """
    head = head_name(model)
    blocks = [m for name, m in model.named_children()
              if name != head and any(True for _ in m.parameters())]
    groups = [[p for m in part for p in m.parameters()] for part in (blocks[:-2], blocks[-2:])]
    groups.append(list(model.get_submodule(head).parameters()))
    if sum(map(len, groups)) != len(list(model.parameters())):
        raise ValueError(f"layer_groups: a {type(model).__name__} has parameters outside its "
                         "children")
    return groups


def freeze_body(model: nn.Module, frozen: bool = True) -> None:
    """Frozen: only the head and the BatchNorm layers train (as fastai freezes: BN's scale and
    shift adapt to the new data). Not frozen: everything trains."""
    keep = {id(p) for p in model.get_submodule(head_name(model)).parameters()}
    keep |= {id(p) for m in model.modules() if isinstance(m, BATCH_NORMS) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in keep)


# --- summary ----------------------------------------------------------------------------


def _shapes(output) -> str:
    if isinstance(output, torch.Tensor):
        return "x".join(str(d) for d in output.shape)
    if isinstance(output, (tuple, list)):
        return ", ".join(_shapes(o) for o in output)
    return type(output).__name__


def model_summary(model: nn.Module, batch: torch.Tensor, leaves: bool = False) -> str:
    """A table of layer name, type, output shape and parameter count, from one forward pass.

    Lists the model's direct children (or, with `leaves=True`, every module without
    children). The pass runs in eval mode under no_grad so BatchNorm's running statistics
    are not changed; each module's mode is restored afterwards. `batch` must already be on
    the model's device.
    """
    if leaves:
        targets = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    else:
        targets = list(model.named_children())
    rows: list[tuple[str, str, str, str]] = []

    def recorder(name: str, module: nn.Module):
        def hook(_module, _inputs, output):
            n_params = sum(p.numel() for p in module.parameters())
            rows.append((name, type(module).__name__, _shapes(output), f"{n_params:,}"))

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(recorder(n, m)) for n, m in targets]
    try:
        model.eval()
        with torch.no_grad():
            out = model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    header = ("layer", "type", "output shape", "params")
    rows.insert(0, ("input", "", _shapes(batch), ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def fmt(row):
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)]
    lines.append(f"output: {_shapes(out)}; parameters: {total:,} ({trainable:,} trainable)")
    return "\n".join(lines)
