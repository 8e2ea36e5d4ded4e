"""Layer-wise Sequential Unit Variance init (Mishkin & Matas 2015; course nb_07a).

Run one real batch through the model and, layer by layer in forward order, rescale each
conv/linear layer until its output has std 1 and shift it until its mean is 0.

Where the output is measured: when a conv/linear layer is directly followed by a
`GeneralRelu` (the course CNN's `conv_layer`), the measurement is taken *after* the
activation and the mean is moved with the activation's `sub`, as the course's `ConvLayer`
did by mapping `bias` to `-relu.sub`. Otherwise the layer's own output is measured and its
bias moves the mean; a layer without a bias (e.g. an XResNet conv followed by BatchNorm)
only gets its std set.

Fixes over the course: no globals (the exported `lsuv_module` used a notebook-global `mdl`
and an undefined `append_mean`), an iteration cap (the course looped forever on a layer
whose std cannot reach 1), and mean and std are set together: the std step also scales the
layer's bias and the activation's `sub`, which rescales the measured output exactly for a
(leaky) ReLU, so setting the std no longer undoes the mean as in the notebook.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from trainer.models import GeneralRelu

LINEAR_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_MIN_STD = 1e-8  # below this the output is constant and no rescaling can help


class LayerStats(NamedTuple):
    name: str  # qualified name of the conv/linear layer
    mean: float  # mean of the measured output after LSUV
    std: float  # std of the measured output after LSUV


@dataclass
class _Unit:
    name: str
    layer: nn.Module  # the conv/linear layer whose weight (and bias) set the std
    probe: nn.Module  # the module whose output is measured
    shifter: nn.Module | None  # GeneralRelu (its `sub`), the layer (its bias), or None


class _StopForward(Exception):
    """Raised by the probe hook: the rest of the network is not needed for this layer."""


class _LayerNotUsed(Exception):
    """The layer's output never appeared during the forward pass."""


def _find_units(model: nn.Module) -> list[_Unit]:
    activation_after: dict[nn.Module, GeneralRelu] = {}
    for container in model.modules():
        if isinstance(container, nn.Sequential):
            children = list(container.children())
            for first, second in zip(children, children[1:], strict=False):
                if isinstance(first, LINEAR_LAYERS) and isinstance(second, GeneralRelu):
                    activation_after[first] = second
    units = []
    for name, module in model.named_modules():
        if not isinstance(module, LINEAR_LAYERS):
            continue
        act = activation_after.get(module)
        if act is not None:
            units.append(_Unit(name, module, act, act))
        else:
            shifter = module if module.bias is not None else None
            units.append(_Unit(name, module, module, shifter))
    return units


def _measure(model: nn.Module, probe: nn.Module, batch: torch.Tensor) -> tuple[float, float]:
    stats: list[tuple[float, float]] = []

    def hook(_module, _inputs, output):
        out = output.detach().float()
        stats.append((out.mean().item(), out.std().item()))
        raise _StopForward

    handle = probe.register_forward_hook(hook)
    try:
        model(batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not stats:
        raise _LayerNotUsed("it was not used in the model's forward pass")
    return stats[0]


def _converged(unit: _Unit, mean: float, std: float, tol: float) -> bool:
    mean_ok = unit.shifter is None or abs(mean) < tol
    return mean_ok and abs(std - 1) < tol


def _lsuv_unit(
    model: nn.Module, unit: _Unit, batch: torch.Tensor, tol: float, max_iters: int
) -> LayerStats:
    mean, std = _measure(model, unit.probe, batch)
    for _ in range(max_iters):
        if not (math.isfinite(mean) and math.isfinite(std)) or _converged(unit, mean, std, tol):
            break
        can_scale = std > _MIN_STD
        if can_scale:
            # Scale weight, bias and sub together: the measured output scales by 1/std.
            unit.layer.weight.div_(std)
            if unit.layer.bias is not None:
                unit.layer.bias.div_(std)
            if isinstance(unit.shifter, GeneralRelu):
                unit.shifter.sub.div_(std)
            mean = mean / std
        if isinstance(unit.shifter, GeneralRelu):
            unit.shifter.sub.add_(mean)  # the activation subtracts sub
        elif unit.shifter is not None:
            unit.shifter.bias.sub_(mean)
        elif not can_scale:
            break  # constant output and nothing to shift: no knob left to turn
        mean, std = _measure(model, unit.probe, batch)
    if not _converged(unit, mean, std, tol):
        warnings.warn(
            f"LSUV: layer {unit.name!r} stopped at mean={mean:.4g}, std={std:.4g} "
            f"(wanted |mean| < {tol} and |std - 1| < {tol}; at most {max_iters} iterations)",
            stacklevel=3,
        )
    return LayerStats(unit.name, mean, std)


def lsuv_init(
    model: nn.Module, batch: torch.Tensor, tol: float = 1e-3, max_iters: int = 10
) -> list[LayerStats]:
    """Apply LSUV to every conv/linear layer of `model`, in forward order, in place.

    `batch` is a float input batch on the model's device, normalised as in training. The
    passes run in eval mode (BatchNorm uses its fresh running statistics, so its running
    statistics are not updated and dropout is off) under no_grad; every module's mode is
    restored afterwards. Returns (name, mean, std) of each layer's measured output; a layer
    that cannot reach the target within `max_iters` is reported with a warning.
    """
    if not torch.is_floating_point(batch):
        raise TypeError(
            f"lsuv_init needs a float, normalised input batch; got {batch.dtype} "
            "(convert uint8 images on the device first)"
        )
    if max_iters < 1 or not tol > 0:
        raise ValueError(f"lsuv_init needs max_iters >= 1 and tol > 0, got {max_iters}, {tol}")
    param = next(model.parameters(), None)
    if param is not None and param.device != batch.device:
        raise ValueError(
            f"lsuv_init: the batch is on {batch.device} but the model is on {param.device}"
        )
    modes = {m: m.training for m in model.modules()}
    results = []
    try:
        model.eval()
        with torch.no_grad():
            for unit in _find_units(model):
                try:
                    results.append(_lsuv_unit(model, unit, batch, tol, max_iters))
                except _LayerNotUsed as err:
                    warnings.warn(f"LSUV: skipped layer {unit.name!r}: {err}", stacklevel=2)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return results
