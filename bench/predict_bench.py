"""Inference throughput: `tench predict --shards` against the plain PyTorch loop.

    .venv/bin/python bench/predict_bench.py [--images 2000] [--arch cnn] [--size 64] [--rounds 3]

Makes a sample set (`tench sample`: 160 px, 9 in 10 JPEG) whose validation split has
`--images` images, shards it, and writes a run folder holding a seeded model of `--arch`
(untrained: the speed does not depend on the weights). Then, in alternating rounds, in this
one process, with the same model on the same device and the same images:

    tench           trainer.predict.predict_shards: ShardStream actors (one per core) decode
                    and centre-crop as uint8, normalise + forward on the device, CSV written
    imagefolder     torchvision ImageFolder + DataLoader(num_workers=cores, batch 64), the
                    usual Resize + CenterCrop + ToTensor + Normalize in the workers, then
                    model.eval() under torch.inference_mode
    imagefolder-u8  the same, but the workers send uint8 (PILToTensor) and the main process
                    normalises: the stronger baseline (4x fewer bytes between processes)

Each round times one whole pass, from building the loader (or stream) to the last
prediction; Ray is started once, before the rounds (reported apart). images/s is the best
round's; the ratio is tench over the faster baseline. `agree` is the share of images whose
predicted class is the same as tench's (the resize kernels differ slightly).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import cores  # noqa: E402

from pipeline.source import ShardSource  # noqa: E402
from pipeline.stream import ensure_ray  # noqa: E402
from pipeline.transforms import VALID_ZOOM  # noqa: E402
from shards.sample import make_sample  # noqa: E402
from shards.sharder import shard_folder  # noqa: E402
from tests.trained_run import write_untrained_run  # noqa: E402
from trainer.callbacks.device import Normalize  # noqa: E402
from trainer.inference import load_predictor, split_stream  # noqa: E402
from trainer.predict import predict_shards  # noqa: E402
from trainer.run_dir import load_model  # noqa: E402

BATCH = 64


def prepare(work: Path, images: int, arch: str, size: int) -> None:
    if not (work / "images" / "val").exists():
        make_sample(work / "images", per_class=1, valid_per_class=images // 10, force=True)
    if not (work / "shards" / "meta.json").exists():
        shard_folder(work / "images", work / "shards", progress=False)
    meta = json.loads((work / "shards" / "meta.json").read_text())
    write_untrained_run(work / "run", meta["vocab"], meta["stats"], size=size, arch=arch)


def run_tench(work: Path, device: str) -> tuple[int, dict]:
    predictor = load_predictor(work / "run", device)
    out = io.StringIO()
    summary = predict_shards(predictor, work / "shards", out, "valid", batch_size=BATCH)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    return summary.rows, {r["path"].split("/", 1)[1]: r["prediction"] for r in rows}


def run_imagefolder(work: Path, device: str, uint8: bool) -> tuple[int, dict]:
    trained = load_model(work / "run")
    model = trained.model.to(device).eval()
    resize = round(trained.size * VALID_ZOOM)
    tfms = [v2.Resize(resize, antialias=True), v2.CenterCrop(trained.size), v2.PILToTensor()]
    if not uint8:
        tfms += [v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(trained.stats["mean"], trained.stats["std"])]
    ds = torchvision.datasets.ImageFolder(work / "images" / "val", transform=v2.Compose(tfms))
    loader = DataLoader(ds, batch_size=BATCH, num_workers=cores(),
                        pin_memory=device.startswith("cuda"))
    normalize = Normalize.from_stats(trained.stats).to(device)
    predictions = []
    with torch.inference_mode():
        for images, _labels in loader:
            images = images.to(device, non_blocking=True)
            x = normalize(images) if uint8 else images
            predictions += model(x).argmax(dim=1).tolist()
    names = [os.path.relpath(path, work / "images" / "val") for path, _ in ds.samples]
    return len(predictions), {n: ds.classes[p] for n, p in zip(names, predictions, strict=True)}


def breakdown(work: Path, device: str) -> None:
    """Where tench's pass goes: actor start, the stream alone, the model alone."""
    predictor = load_predictor(work / "run", device)
    source = ShardSource.of(work / "shards")
    t = time.perf_counter()
    with split_stream(predictor, source, "valid", BATCH) as stream:
        stream.actor_pids()
        up = time.perf_counter() - t
        t = time.perf_counter()
        images = [batch.images for batch in stream]
        decoded = time.perf_counter() - t
    t = time.perf_counter()
    for batch in images:
        predictor.probabilities(batch).cpu()
    model = time.perf_counter() - t
    n = sum(len(b) for b in images)
    print(f"breakdown: actors up {up:.2f}s; stream alone {n / decoded:.0f} images/s; "
          f"model alone {n / model:.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tench-predict-bench"))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the main process (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # DataLoader workers and actors use 1 each anyway
    prepare(args.work, args.images, args.arch, args.size)
    t = time.perf_counter()
    ensure_ray()
    ray_up = time.perf_counter() - t
    methods = {"tench": lambda: run_tench(args.work, args.device),
               "imagefolder": lambda: run_imagefolder(args.work, args.device, uint8=False),
               "imagefolder-u8": lambda: run_imagefolder(args.work, args.device, uint8=True)}
    times: dict[str, list[float]] = {m: [] for m in methods}
    predictions: dict[str, dict] = {}
    for r in range(args.rounds):
        order = list(methods)[r % len(methods):] + list(methods)[:r % len(methods)]
        for name in order:
            t = time.perf_counter()
            n, predictions[name] = methods[name]()
            times[name].append(time.perf_counter() - t)
            print(f"round {r}: {name:15s} {n} images in {times[name][-1]:.2f}s", flush=True)
    print(f"\n{args.images} images, {args.arch} at {args.size} px, batch {BATCH}, "
          f"{args.device}, {cores()} cores, {torch.get_num_threads()} torch threads in the main "
          f"process, torch {torch.__version__}; Ray up in {ray_up:.1f}s "
          "(not counted)\n")
    best = {m: n_images(predictions[m]) / min(ts) for m, ts in times.items()}
    baseline = max(best["imagefolder"], best["imagefolder-u8"])
    print("| method | images/s (best) | rounds (s) | tench / faster baseline | agree with tench |")
    print("|---|---:|---|---:|---:|")
    for m in methods:
        agree = sum(predictions[m][k] == v for k, v in predictions["tench"].items()) / len(
            predictions["tench"])
        ratio = f"{best['tench'] / baseline:.2f}" if m == "tench" else ""
        rounds = ", ".join(f"{s:.2f}" for s in times[m])
        print(f"| {m} | {best[m]:.0f} | {rounds} | {ratio} | {agree:.1%} |")
    breakdown(args.work, args.device)


def n_images(predictions: dict) -> int:
    return len(predictions)


if __name__ == "__main__":
    main()
