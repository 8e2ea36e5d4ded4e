"""ms per optimizer step(): tench vs torch.optim (foreach=True / False) vs a per-parameter loop.

Two parameter sets: the course's lesson-11 CNN (~0.47M params, 23 tensors) and ResNet-50's
parameter shapes (~25.6M params, 161 tensors). Gradients are fixed random tensors: only step()
is timed. Implementations are timed in interleaved rounds (the start rotates each round) and the
median round is reported, because other processes share this machine's CPU.

    .venv/bin/python bench/optim_bench.py                 # CPU
    .venv/bin/python bench/optim_bench.py --device cuda   # GPU
    .venv/bin/python bench/optim_bench.py --threads 1 --rounds 3 --faults  # + page faults
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from trainer.optim import adam, lamb, sgd

LR, MOM, SQR_MOM, EPS, WD = 1e-3, 0.9, 0.99, 1e-6, 0.01


def course_cnn() -> nn.Sequential:
    """Lesson 11's get_cnn_model(nfs=[64,64,128,256]) with conv_layer (conv, ReLU, BatchNorm)."""

    def layer(ni: int, nf: int, stride: int = 2) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=stride, padding=1, bias=False),
                             nn.ReLU(), nn.BatchNorm2d(nf))

    nfs = [64, 64, 64, 128, 256]
    return nn.Sequential(layer(3, 16, 1), layer(16, 32), layer(32, 64),
                         *[layer(nfs[i], nfs[i + 1]) for i in range(len(nfs) - 1)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def param_set(name: str, device: str) -> list[torch.Tensor]:
    model = course_cnn() if name == "course CNN" else torchvision.models.resnet50(weights=None)
    return [p.detach().to(device) for p in model.parameters()]


def with_grads(shapes: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """A fresh copy of the parameters, each with a fixed random gradient."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for p in shapes:
        q = p.clone().requires_grad_()
        q.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.device)
        params.append(q)
    return params


# --------------------------------------------------------------------------- per-parameter loops


def loop_sgd(params: list[torch.Tensor]) -> Callable[[], None]:
    bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step() -> None:
        for p, buf in zip(params, bufs, strict=True):
            buf.mul_(MOM).add_(p.grad)
            p.add_(buf, alpha=-LR)

    return step


def loop_adamw(params: list[torch.Tensor]) -> Callable[[], None]:
    ms, vs, t = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [0]

    @torch.no_grad()
    def step() -> None:
        t[0] += 1
        bc1, bc2 = 1 - MOM ** t[0], 1 - SQR_MOM ** t[0]
        for p, m, v in zip(params, ms, vs, strict=True):
            p.mul_(1 - LR * WD)
            m.lerp_(p.grad, 1 - MOM)
            v.mul_(SQR_MOM).addcmul_(p.grad, p.grad, value=1 - SQR_MOM)
            p.addcdiv_(m, (v / bc2).sqrt_().add_(EPS), value=-LR / bc1)

    return step


def loop_lamb(params: list[torch.Tensor]) -> Callable[[], None]:
    """LAMB transcribed per layer (the trust ratio stays on the device: no sync per layer)."""
    ms, vs, t = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [0]

    @torch.no_grad()
    def step() -> None:
        t[0] += 1
        bc1, bc2 = 1 - MOM ** t[0], 1 - SQR_MOM ** t[0]
        for p, m, v in zip(params, ms, vs, strict=True):
            m.lerp_(p.grad, 1 - MOM)
            v.mul_(SQR_MOM).addcmul_(p.grad, p.grad, value=1 - SQR_MOM)
            u = (m / bc1).div_((v / bc2).sqrt_().add_(EPS)).add_(p, alpha=WD)
            p_norm, u_norm = p.norm(), u.norm()
            trust = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0).clamp_(max=10)
            p.sub_(u.mul_(trust * LR))

    return step


IMPLEMENTATIONS: dict[str, dict[str, Callable[[list[torch.Tensor]], Callable[[], None]]]] = {
    "SGD-momentum": {
        "tench": lambda p: sgd(p, LR, mom=MOM).step,
        "torch foreach": lambda p: torch.optim.SGD(p, LR, momentum=MOM, foreach=True).step,
        "torch single": lambda p: torch.optim.SGD(p, LR, momentum=MOM, foreach=False).step,
        "loop": loop_sgd,
    },
    "AdamW": {
        "tench": lambda p: adam(p, LR, mom=MOM, sqr_mom=SQR_MOM, eps=EPS, wd=WD).step,
        "torch foreach": lambda p: torch.optim.AdamW(p, LR, betas=(MOM, SQR_MOM), eps=EPS,
                                                     weight_decay=WD, foreach=True).step,
        "torch single": lambda p: torch.optim.AdamW(p, LR, betas=(MOM, SQR_MOM), eps=EPS,
                                                    weight_decay=WD, foreach=False).step,
        "loop": loop_adamw,
    },
    "LAMB": {  # torch has no LAMB: its AdamW (less work per step) is the floor
        "tench": lambda p: lamb(p, LR, mom=MOM, sqr_mom=SQR_MOM, eps=EPS, wd=WD).step,
        "torch foreach": lambda p: torch.optim.AdamW(p, LR, betas=(MOM, SQR_MOM), eps=EPS,
                                                     weight_decay=WD, foreach=True).step,
        "torch single": lambda p: torch.optim.AdamW(p, LR, betas=(MOM, SQR_MOM), eps=EPS,
                                                    weight_decay=WD, foreach=False).step,
        "loop": loop_lamb,
    },
}


def one_chunk(make: Callable[[list[torch.Tensor]], Callable[[], None]]):
    """tench with its CPU chunking switched off: the whole group in each foreach call."""

    def build(params: list[torch.Tensor]) -> Callable[[], None]:
        opt = make(params).__self__
        opt.cpu_chunk_numel = 1 << 62
        return opt.step

    return build


for _makers in IMPLEMENTATIONS.values():
    _makers["tench 1-chunk"] = one_chunk(_makers["tench"])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(steppers: dict[str, Callable[[], None]], steps: int, rounds: int,
               device: str) -> dict[str, float]:
    """Median over rounds of ms per step; every round runs each implementation once, in an
    order that rotates so none always runs first (or right after the slowest)."""
    names = list(steppers)
    for step in steppers.values():  # warm-up: state allocation, lazy init, caches
        for _ in range(3):
            step()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                steppers[name]()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1000 / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def faults_per_step(steppers: dict[str, Callable[[], None]], steps: int) -> dict[str, float]:
    """Minor page faults per step of each implementation (this process, after a warm-up):
    memory freed to the OS and touched again each step shows here."""
    out = {}
    for name, step in steppers.items():
        step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            step()
        out[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
    return out


def fwd_bwd_ms(device: str, reps: int = 3) -> float:
    """Context: one forward+backward of the course CNN, batch 64 at 128 px."""
    model = course_cnn().to(device)
    x = torch.randn(64, 3, 128, 128, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    times = []
    for _ in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--faults", action="store_true",
                        help="also minor page faults per step (CPU), a row per implementation")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    print(f"device={args.device} "
          f"({torch.cuda.get_device_name() if gpu else f'{torch.get_num_threads()} threads'}) "
          f"torch={torch.__version__} rounds={args.rounds}")
    header = (f"{'param set':<11} {'algorithm':<13} {'tench':>8} {'foreach':>8} {'single':>8} "
              f"{'loop':>8} {'1-chunk':>8}  {'tench/best torch':>16} {'tench/loop':>10}")
    print(header)
    print("-" * len(header))
    for set_name, steps in (("course CNN", 200 if gpu else 50), ("ResNet-50", 50 if gpu else 3)):
        shapes = param_set(set_name, args.device)
        for algorithm, makers in IMPLEMENTATIONS.items():
            steppers = {name: make(with_grads(shapes)) for name, make in makers.items()}
            ms = time_steps(steppers, steps, args.rounds, args.device)
            best = min(ms["torch foreach"], ms["torch single"])
            print(f"{set_name:<11} {algorithm:<13} {ms['tench']:8.3f} {ms['torch foreach']:8.3f} "
                  f"{ms['torch single']:8.3f} {ms['loop']:8.3f} {ms['tench 1-chunk']:8.3f}  "
                  f"{ms['tench'] / best:16.2f} {ms['tench'] / ms['loop']:10.2f}")
            if args.faults:
                faults = faults_per_step(steppers, steps)
                print(f"{'':<11} {'page faults':<13} " + ", ".join(
                    f"{name} {count:,.0f}" for name, count in faults.items()))
            del steppers
        n = sum(p.numel() for p in shapes)
        print(f"{'':<11} ({len(shapes)} tensors, {n / 1e6:.2f}M params)")
    print("ms per step(), median of rounds. foreach/single: torch.optim with foreach=True/False. "
          "loop: a per-parameter Python loop. 1-chunk: tench with CPU chunking off. "
          "LAMB rows: the torch columns are torch AdamW (torch has no LAMB), the floor under "
          "LAMB's extra work; its loop is LAMB transcribed per layer.")
    print(f"context: course CNN forward+backward, batch 64 at 128 px: "
          f"{fwd_bwd_ms(args.device):.1f} ms")


if __name__ == "__main__":
    main()
