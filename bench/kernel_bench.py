"""Per-call and per-image costs quoted in the pipeline's docstrings, each printed by name.

    .venv/bin/python bench/kernel_bench.py [--per-class 20] [--rounds 5] [--threads 1]

On `tench sample` images (160 px shorter side, 9 in 10 JPEG, 1 in 10 PNG), in this process,
one torch thread (an actor's setting). Each figure is the median over `--rounds` of the
mean time per call. Sections:

- kernels: the 160 -> 128 px crop (torch channels-last vs PIL vs a transposing copy), the
  flip (torch vs PIL vs numpy), a transpose (PIL vs numpy), per-item randomness (re-seeded
  PCG64 vs a fresh `default_rng`), the JPEG size check (`jpeg_size` vs `Image.open`), the
  batch copy in `to_batch` (plain vs transposing);
- decode: torchvision's JPEG operator called directly vs through `decode_jpeg`, and images/s
  per core for PIL vs torchvision, alone and with a resize of the shorter side to 128; a
  1280x960 JPEG decoded in full vs in draft mode; PNG through PIL and through torchvision;
- reader: per image, the stages of `ShardReader` in-process: tar parsing and sample
  grouping, decode (JPEG, PNG, the mix), the training transforms; and `tarfile` per member.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import kernels  # noqa: E402
from pipeline.actors import ItemRandom  # noqa: E402
from pipeline.decode import _decode_jpeg_torchvision, decode_image, jpeg_size  # noqa: E402
from pipeline.tarstream import iter_tar  # noqa: E402
from pipeline.transforms import train_tfms  # noqa: E402


def us_per_call(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Median over rounds of the mean µs per call (one warm-up call first)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def us_per_item(fn: Callable, items: list, rounds: int) -> float:
    """Median over rounds of the mean µs per item of `fn(item)` over all `items`."""
    return us_per_call(lambda: [fn(x) for x in items], 1, rounds) / len(items)


def row(name: str, us: float) -> None:
    print(f"  {name:<58}{us:>9.1f} us{1e6 / us:>10,.0f} /s", flush=True)


def load_samples(folder: Path) -> tuple[list[bytes], list[bytes]]:
    files = sorted(p for p in (folder / "train").rglob("*") if p.is_file())
    jpegs = [p.read_bytes() for p in files if p.suffix.lower() in (".jpg", ".jpeg")]
    pngs = [p.read_bytes() for p in files if p.suffix.lower() == ".png"]
    return jpegs, pngs


def kernel_rows(image: np.ndarray, rounds: int) -> None:
    print("kernels (one image, 160 px source, 128 px output)")
    crop = image[10:140, 10:140]  # a strided 130 px crop view, as the random crop makes
    row("crop 130 -> 128 px: torch uint8, channels-last (tench)",
        us_per_call(lambda: kernels.resize(np.ascontiguousarray(crop), 128, 128), 200, rounds))

    def transposing() -> np.ndarray:
        nchw = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].contiguous()
        out = F.interpolate(nchw, size=(128, 128), mode="bilinear", antialias=True)
        return out[0].permute(1, 2, 0).contiguous().numpy()

    row("crop 130 -> 128 px: torch, NCHW + transposing copy back", us_per_call(
        transposing, 200, rounds))
    pil = Image.fromarray(image)
    row("crop 160 -> 128 px: PIL Image.resize(BILINEAR, box=...)", us_per_call(
        lambda: np.asarray(pil.resize((128, 128), Image.BILINEAR, box=(10, 10, 150, 150))),
        200, rounds))
    small = np.ascontiguousarray(image[:128, :128])
    row("flip 128 px: torch.flip (tench)", us_per_call(
        lambda: kernels.flip_horizontal(small), 500, rounds))
    row("flip 128 px: PIL transpose", us_per_call(lambda: np.asarray(
        Image.fromarray(small).transpose(Image.Transpose.FLIP_LEFT_RIGHT)), 500, rounds))
    row("flip 128 px: numpy copy of the reversed view", us_per_call(
        lambda: np.ascontiguousarray(small[:, ::-1]), 500, rounds))
    row("transpose 128 px: PIL (tench)", us_per_call(
        lambda: kernels.transpose(small, Image.Transpose.TRANSPOSE), 500, rounds))
    row("transpose 128 px: numpy strided copy", us_per_call(
        lambda: np.ascontiguousarray(small.transpose(1, 0, 2)), 500, rounds))
    item_random = ItemRandom()
    row("per-item rng: re-seeded PCG64 (tench ItemRandom)", us_per_call(
        lambda: item_random(0, 1, "n01440764/img_000123"), 2000, rounds))
    row("per-item rng: fresh np.random.default_rng([seed, epoch, hash])", us_per_call(
        lambda: np.random.default_rng([0, 1, hash("n01440764/img_000123") & 0xFFFFFFFF]),
        2000, rounds))
    batch = np.zeros((64, 128, 128, 3), np.uint8)
    row("to_batch: plain copy of 64 x 128 px HWC (tench)", us_per_call(
        lambda: torch.from_numpy(batch.copy()), 50, rounds))
    row("to_batch: transposing copy to contiguous NCHW", us_per_call(
        lambda: torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(), 50, rounds))


def decode_rows(jpegs: list[bytes], pngs: list[bytes], rounds: int) -> None:
    from torchvision.io import decode_jpeg, decode_png

    print(f"decode ({len(jpegs)} JPEGs, {len(pngs)} PNGs)")
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    row("JPEG: torchvision operator called directly (tench)",
        us_per_item(_decode_jpeg_torchvision, jpegs, rounds))
    row("JPEG: torchvision.io.decode_jpeg (the wrapper)",
        us_per_item(lambda t: decode_jpeg(t, apply_exif_orientation=True), tensors, rounds))
    row("JPEG: PIL open + load", us_per_item(
        lambda d: Image.open(io.BytesIO(d)).load(), jpegs, rounds))

    def torch_resize(d: bytes) -> np.ndarray:
        image = _decode_jpeg_torchvision(d)
        h, w = kernels.shorter_side_size(*image.shape[:2], 128)
        return kernels.resize(image, h, w)

    def pil_resize(d: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(d)).convert("RGB")
        scale = 128 / min(image.size)
        size = (round(image.size[0] * scale), round(image.size[1] * scale))
        return np.asarray(image.resize(size, Image.BILINEAR))

    row("JPEG + shorter side to 128: torchvision + torch resize", us_per_item(
        torch_resize, jpegs, rounds))
    row("JPEG + shorter side to 128: PIL + PIL resize", us_per_item(pil_resize, jpegs, rounds))
    row("JPEG size check: jpeg_size (header walk)", us_per_item(jpeg_size, jpegs, rounds))
    row("JPEG size check: PIL Image.open(...).size", us_per_item(
        lambda d: Image.open(io.BytesIO(d)).size, jpegs, rounds))
    # a large JPEG (an upscaled sample image, quality 90) for draft mode
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).convert("RGB").resize((1280, 960)).save(
        buffer, "JPEG", quality=90)
    big = buffer.getvalue()

    def shorter_128(image: np.ndarray) -> np.ndarray:
        return kernels.resize(image, *kernels.shorter_side_size(*image.shape[:2], 128))

    row("1280x960 JPEG: full decode (torchvision)", us_per_call(
        lambda: decode_image(big, "jpg"), 20, rounds))
    row("1280x960 JPEG: draft decode for a 128 px target (PIL, 1/4)", us_per_call(
        lambda: decode_image(big, "jpg", 128), 20, rounds))
    row("1280x960 JPEG: full decode + resize to 128", us_per_call(
        lambda: shorter_128(decode_image(big, "jpg")), 20, rounds))
    row("1280x960 JPEG: draft decode + resize to 128", us_per_call(
        lambda: shorter_128(decode_image(big, "jpg", 128)), 20, rounds))
    if pngs:
        row("PNG: PIL (tench)", us_per_item(lambda d: decode_image(d, "png"), pngs, rounds))
        row("PNG: torchvision decode_png", us_per_item(
            lambda d: decode_png(torch.frombuffer(bytearray(d), dtype=torch.uint8)), pngs,
            rounds))


def reader_rows(images: Path, work: Path, rounds: int) -> None:
    from pipeline.source import iter_samples
    from shards.sharder import shard_folder

    shard_folder(images, work / "shards", processes=1, progress=False)
    tars = sorted((work / "shards").glob("train-*.tar"))
    data = [t.read_bytes() for t in tars]
    n = sum(1 for d in data for _ in iter_samples(io.BytesIO(d), "x"))
    members = sum(1 for d in data for _ in iter_tar(io.BytesIO(d)))
    print(f"reader, per image ({n} training samples, {members} tar members, in-process)")
    row("tar parsing + sample grouping (tench iter_samples)", us_per_call(
        lambda: [s for d in data for s in iter_samples(io.BytesIO(d), "x")],
        1, rounds) / n)
    row("tarfile, per member (TarInfo objects)", us_per_call(
        lambda: [m for d in data for m in tarfile.open(fileobj=io.BytesIO(d))], 1, rounds)
        / members)
    samples = [s for d in data for s in iter_samples(io.BytesIO(d), "x")]
    row("decode, the mix as stored (tench decode_image)", us_per_item(
        lambda s: decode_image(s.data, s.ext, 128), samples, rounds))
    for ext in ("jpg", "png"):
        part = [s for s in samples if s.ext == ext]
        if part:
            row(f"decode, {ext} only", us_per_item(
                lambda s: decode_image(s.data, s.ext, 128), part, rounds))
    decoded = [decode_image(s.data, s.ext, 128) for s in samples]
    tfms, item_random = train_tfms(128), ItemRandom()
    row("training transforms (random-resized crop + flip), 128 px", us_per_item(
        lambda i: tfms(decoded[i], item_random(0, 0, str(i))), list(range(len(decoded))),
        rounds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20, help="sample images per class")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from shards.sample import make_sample

    with tempfile.TemporaryDirectory(prefix="kernel_bench_") as folder:
        work = Path(folder)
        make_sample(work / "images", per_class=args.per_class, valid_per_class=1, seed=0)
        jpegs, pngs = load_samples(work / "images")
        first = np.asarray(Image.open(io.BytesIO(jpegs[0])).convert("RGB"))
        print(f"torch {torch.__version__}, {args.threads} torch thread(s), median of "
              f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
        kernel_rows(np.ascontiguousarray(first[:160, :160]), args.rounds)
        decode_rows(jpegs, pngs, args.rounds)
        reader_rows(work / "images", work, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
