"""The plain PyTorch training script a careful user writes: the baseline of accuracy_bench.py.

torchvision `ImageFolder` + `DataLoader` (all cores, persistent workers, pinned memory on
CUDA) + `torch.optim.AdamW` + `OneCycleLR` + channels_last (+ bf16 autocast on CUDA), the
same model class as `tench fit --arch`, the same augmentation (random-resized crop with scale
0.35-1 and a flip; validation: shorter side to 1.14 x size, centre crop) and the same
hyper-parameters as tench's adam + one-cycle. It writes OUT/metrics.json after every epoch
in `tench fit`'s row format (accuracy, seconds, data_wait, images_per_s), so the bench reads
both the same way.

    python bench/plain_loop.py IMAGES --out RUN --epochs 5 --seed 0 [--size 64] [--arch cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import FitConfig  # noqa: E402  (defaults only: the same hyper-parameters)
from trainer.models import create_model  # noqa: E402  (the same model class)


def loaders(images: Path, size: int, batch_size: int, stats: dict, workers: int, cuda: bool):
    norm = transforms.Normalize(stats["mean"], stats["std"])
    train_tfms = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    valid_tfms = transforms.Compose([
        transforms.Resize(round(size * 1.14), antialias=True), transforms.CenterCrop(size),
        transforms.ToTensor(), norm])
    train = datasets.ImageFolder(images / "train", train_tfms)
    valid = datasets.ImageFolder(images / "val", valid_tfms)
    common = {"num_workers": workers, "pin_memory": cuda, "persistent_workers": workers > 0}
    return (DataLoader(train, batch_size, shuffle=True, drop_last=len(train) % batch_size == 1,
                       **common),
            DataLoader(valid, batch_size * 2, **common), len(train.classes))


def write_rows(out: Path, rows: list[dict]) -> None:
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, out / "metrics.json")


def main(argv: list[str] | None = None) -> None:
    d = FitConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", type=Path, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stats", type=Path, help="meta.json whose mean/std to normalise with")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    stats = (json.loads(args.stats.read_text())["stats"] if args.stats
             else {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    train, valid, n_classes = loaders(args.images, args.size, args.batch_size, stats,
                                      args.workers, cuda)
    model = create_model(args.arch, n_classes).to(device, memory_format=torch.channels_last)
    # tench's adam defaults (mom 0.9, sqr_mom 0.99, eps 1e-5, decoupled wd) and one-cycle
    # (lr/25 -> lr -> lr/1e5, cosine; momentum 0.95 -> 0.85 -> 0.95)
    opt = torch.optim.AdamW(model.parameters(), lr=d.lr, betas=(0.9, 0.99), eps=1e-5,
                            weight_decay=d.wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=d.lr, total_steps=args.epochs * len(train), pct_start=d.pct_start,
        div_factor=25.0, final_div_factor=1e5 / 25, base_momentum=0.85, max_momentum=0.95)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        model.train()
        wait, seen, fetch_start = 0.0, 0, time.perf_counter()
        for x, y in train:
            wait += time.perf_counter() - fetch_start
            x = x.to(device, non_blocking=cuda, memory_format=torch.channels_last)
            y = y.to(device, non_blocking=cuda)
            with autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += y.shape[0]
            fetch_start = time.perf_counter()
        model.eval()
        correct = total = 0
        with torch.no_grad(), autocast():
            for x, y in valid:
                x = x.to(device, non_blocking=cuda, memory_format=torch.channels_last)
                pred = model(x).argmax(1).cpu()
                correct += int((pred == y).sum())
                total += y.shape[0]
        seconds = time.perf_counter() - start
        rows.append({"epoch": epoch, "train_loss": loss.item(), "accuracy": correct / total,
                     "seconds": round(seconds, 3), "data_wait": round(wait, 3),
                     "images_per_s": round(seen / seconds, 1)})
        write_rows(args.out, rows)
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
