"""Speed of one training step (forward + backward + AdamW) on synthetic batches, per variant.

Variants of the same model and batch, in interleaved rounds so machine noise hits them alike:
`eager` (fp32, contiguous), `channels_last`, `bf16` (autocast; on the CPU too), `bf16+cl`
and, with `--compile`, the same through `torch.compile`. Prints images/s and the ratio to
plain eager for each; the median of `--rounds` rounds of `--steps` steps.

    .venv/bin/python bench/step_bench.py --arch cnn --size 64 --bs 64 --rounds 5
    .venv/bin/python bench/step_bench.py --device cuda --arch xresnet50 xresnet18 --size 128 224

On the CPU the compile variants take minutes to build (and are left out unless asked);
`--quick` shrinks everything so the script's path can be checked in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.models import create_model

VARIANTS = ("eager", "channels_last", "bf16", "bf16+cl")


@dataclass
class Variant:
    name: str
    channels_last: bool
    bf16: bool
    compiled: bool


def variants(with_compile: bool) -> list[Variant]:
    out = [Variant(n, "cl" in n or n == "channels_last", n.startswith("bf16"), False)
           for n in VARIANTS]
    if with_compile:
        out += [Variant(v.name + "+compile", v.channels_last, v.bf16, True) for v in out[:]]
    return out


def make_step(arch: str, variant: Variant, size: int, bs: int, device: torch.device):
    """A closure running one training step, and the batch size it steps."""
    torch.manual_seed(0)
    model = create_model(arch, 10).to(device)
    x = torch.randn(bs, 3, size, size, device=device)
    y = torch.randint(0, 10, (bs,), device=device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if variant.compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, size: int, bs: int, device: torch.device, all_variants: list[Variant],
            steps: int, rounds: int, warmup: int) -> dict[str, float]:
    """{variant: images/s}, median over rounds; a variant that fails is reported, not fatal."""
    steppers, results = {}, {}
    for v in all_variants:
        try:
            step = make_step(arch, v, size, bs, device)
            for _ in range(warmup):
                step()
            sync(device)
            steppers[v.name] = step
        except Exception as e:  # e.g. compile unsupported here: say so, measure the rest
            print(f"  {arch} {size}px {v.name}: skipped ({type(e).__name__}: {e})"[:200])
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for r in range(rounds):
        names = list(steppers)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in names:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                steppers[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        results[name] = steps * bs / statistics.median(ts)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", nargs="+", default=["cnn"])
    parser.add_argument("--size", nargs="+", type=int, default=[64])
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also the torch.compile variants")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the path only")
    args = parser.parse_args()
    if args.quick:
        args.bs, args.steps, args.rounds, args.warmup = 4, 1, 1, 1
        args.size = [min(args.size[0], 32)]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.bs}, median of {args.rounds} rounds x {args.steps} steps")
    print("| arch | size | variant | images/s | vs eager |")
    print("|---|---:|---|---:|---:|")
    for arch in args.arch:
        for size in args.size:
            res = measure(arch, size, args.bs, device, variants(args.compile), args.steps,
                          args.rounds, args.warmup)
            base = res.get("eager")
            for name, rate in res.items():
                ratio = f"{rate / base:.2f}x" if base else "-"
                print(f"| {arch} | {size} | {name} | {rate:,.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
