"""Streaming throughput: ShardStream vs the loaders people use, on the same images and shards.

    .venv/bin/python bench/stream_bench.py [--images 5000] [--epochs 2] [--rounds 1] [--work DIR]

One run makes an Imagenette-like set (`tench sample`: 160 px, 9 in 10 JPEG, 1 in 10 PNG),
shards it, then times, each in a fresh process (so its peak RSS is its own):

    decode-1       the single-process decode + random-resized-crop loop: the per-core limit
    decode-all     the same loop in one process per core: the all-cores limit
    imagefolder    torchvision ImageFolder + DataLoader(num_workers=cores), PIL + transforms.v2
    webloader      webdataset WebDataset(...).shuffle.decode("pil") + WebLoader(num_workers=cores)
    raydata        ray.data.read_webdataset -> map_batches(decode + crop) -> iter_torch_batches
    shardstream    pipeline.ShardStream (default actors = cores)
    shardstream-4x ShardStream on 4x the data (the same shards linked 4 times): memory flat?

All make 128 px uint8 batches of 64 with a random-resized crop and a flip. Reported: images/s
over the last epoch, per core, time to the first batch (cold: from building the loader, after
Ray is up for the Ray ones; warm: at the start of the last epoch), and the peak RSS and PSS
summed over the process tree (driver, workers, raylet, object store), sampled every 50 ms
(less often when a sample is slow, so the sampler stays under ~5% of one core).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cores, tree_memory  # noqa: E402

BATCH, SIZE = 64, 128
METHODS = ("decode-1", "decode-all", "imagefolder", "webloader", "raydata", "shardstream",
           "shardstream-4x")


# ---------------------------------------------------------------------- data
def prepare(work: Path, images: int) -> None:
    """`work/images` (ImageNet layout), `work/shards` (`tench shard`), `work/shards4` (4x)."""
    from shards.sample import make_sample
    from shards.sharder import shard_folder

    if not (work / "images" / "train").exists():
        t = time.perf_counter()
        make_sample(work / "images", per_class=images // 10, valid_per_class=1, force=True)
        print(f"made {images} images in {time.perf_counter() - t:.0f}s", flush=True)
    if not (work / "shards" / "meta.json").exists():
        # 8 MB shards: ~13 for 5,000 images, enough for every loader's workers to share
        shard_folder(work / "images", work / "shards", shard_size=8 << 20, progress=False)
    if not (work / "shards4" / "meta.json").exists():
        link_4x(work / "shards", work / "shards4")


def link_4x(src: Path, out: Path) -> None:
    """4x the data without 4x the disk: each shard hard-linked under 4 names."""
    meta = json.loads((src / "meta.json").read_text())
    meta["splits"].pop("valid", None)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for copy in range(4):
        for s in meta["splits"]["train"]["shards"]:
            name = f"train-{copy}{s['name'][len('train-'):]}"
            if not (out / name).exists():
                os.link(src / s["name"], out / name)
            shards.append(dict(s, name=name))
    meta["splits"]["train"] = {"count": 4 * meta["splits"]["train"]["count"], "shards": shards}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def train_files(work: Path) -> list[Path]:
    return sorted(p for p in (work / "images" / "train").rglob("*") if p.is_file())


def shard_paths(work: Path) -> list[str]:
    return sorted(str(p) for p in (work / "shards").glob("train-*.tar"))  # train split only


# ---------------------------------------------------------------------- the loaders
def tench_item(data: bytes, ext: str, rng) -> np.ndarray:
    """tench's per-item work: decode (torchvision JPEG / PIL) + random-resized crop + flip."""
    from pipeline.decode import decode_image
    from pipeline.transforms import train_tfms

    if SIZE not in _TFMS:
        _TFMS[SIZE] = train_tfms(SIZE)
    tfm = _TFMS[SIZE]
    return tfm(decode_image(data, ext, tfm.decode_size), rng)


_TFMS: dict = {}  # one composed pipeline per process, built on first use


def _decode_files(paths: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # one process = one core, as in a DataLoader worker or an actor
    rng = np.random.default_rng(0)
    for p in paths:
        tench_item(Path(p).read_bytes(), Path(p).suffix[1:].lower(), rng)
    return len(paths)


def run_decode(work: Path, epochs: int, processes: int) -> dict:
    """The plain loop over the image files: no batching, no IPC, the CPU's limit."""
    import multiprocessing as mp

    paths = [str(p) for p in train_files(work)]
    t = time.perf_counter()
    if processes == 1:
        _decode_files(paths[:64])
        first = time.perf_counter() - t
        t = time.perf_counter()
        n = _decode_files(paths)
    else:
        with mp.get_context("fork").Pool(processes) as pool:
            pool.map(_decode_files, [paths[i::processes][:32] for i in range(processes)])
            first = time.perf_counter() - t
            t = time.perf_counter()
            chunks = [paths[i:i + 64] for i in range(0, len(paths), 64)]
            n = sum(pool.imap_unordered(_decode_files, chunks))
    return {"images": n, "seconds": time.perf_counter() - t, "first": [first, None],
            "cores": processes}


def torch_uint8_tfms():
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(SIZE, scale=(0.35, 1),
                                                              antialias=True),
                       v2.RandomHorizontalFlip()])


def epochs_of(make_iter, epochs: int) -> dict:
    """Time `epochs` passes over `make_iter()`; images/s from the last one."""
    import torch

    firsts, n, seconds = [], 0, 0.0
    for _ in range(epochs):
        t = time.perf_counter()
        n, first = 0, None
        for images, _labels in make_iter():
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, SIZE, SIZE)
            if first is None:
                first = time.perf_counter() - t
            n += len(images)
        seconds = time.perf_counter() - t
        firsts.append(first)
    return {"images": n, "seconds": seconds, "first": [firsts[0], firsts[-1]]}


def run_imagefolder(work: Path, epochs: int) -> dict:
    import torchvision
    from torch.utils.data import DataLoader

    t = time.perf_counter()
    ds = torchvision.datasets.ImageFolder(work / "images" / "train", transform=torch_uint8_tfms())
    dl = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=cores())
    out = epochs_of(lambda: iter(dl), epochs)
    out["setup"] = time.perf_counter() - t - out["seconds"]
    return out


def run_webloader(work: Path, epochs: int) -> dict:
    import webdataset as wds

    tfm = torch_uint8_tfms()
    ds = (wds.WebDataset(shard_paths(work), shardshuffle=100)
          .shuffle(1000).decode("pil").to_tuple("jpg;png", "cls")
          .map_tuple(tfm, lambda c: int(c)).batched(BATCH))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=cores())
    return epochs_of(lambda: iter(loader), epochs)


def start_ray() -> float:
    """Ray as `tench fit` starts it (all cores, workers preloading the stream's imports)."""
    from pipeline.stream import ensure_ray

    t = time.perf_counter()
    ensure_ray()
    return time.perf_counter() - t


def run_raydata(work: Path, epochs: int) -> dict:
    """Ray Data as its docs show it, doing tench's per-item work in `map_batches`."""
    import ray

    ray_up = start_ray()

    def decode_batch(batch: dict) -> dict:
        rng = np.random.default_rng()
        images = [tench_item(data, "jpg" if data[:2] == b"\xff\xd8" else "png", rng)
                  for data in batch["image"]]
        labels = np.array([int(c) for c in batch["cls"]], np.int64)
        return {"image": np.stack(images).transpose(0, 3, 1, 2), "label": labels}  # (B, 3, H, W)

    # Mixed .jpg/.png members would become two half-empty columns that Ray Data cannot
    # cast ("Tried to cast column jpg to the TensorArray ..."), so name both "image".
    rename = lambda name: re.sub(r"\.(jpg|png)$", ".image", name)  # noqa: E731
    ds = ray.data.read_webdataset(shard_paths(work), decoder=False, shuffle="files",
                                  filerename=rename)
    ds = ds.map_batches(decode_batch, batch_size=BATCH, batch_format="numpy")

    def batches():
        for b in ds.iter_torch_batches(batch_size=BATCH, dtypes=None):
            yield b["image"], b["label"]

    out = epochs_of(batches, epochs)
    out["ray_up"] = ray_up
    return out


def run_shardstream(work: Path, epochs: int, folder: str) -> dict:
    from pipeline.stream import ShardStream

    ray_up = start_ray()
    # --ray-settle S: build the stream S seconds after ray.init returned, when Ray's
    # prestarted workers have finished preloading torch (as in `tench fit`, where building
    # the model overlaps them); 0 (default): at once, the worst case
    time.sleep(float(os.environ.get("STREAM_BENCH_RAY_SETTLE", "0")))
    t = time.perf_counter()
    with ShardStream(work / folder, "train", batch_size=BATCH, size=SIZE) as stream:
        stream.actor_pids()  # wait for the actor processes (they import torch + torchvision)
        actors_up = time.perf_counter() - t
        out = epochs_of(lambda: ((b.images, b.labels) for b in stream), epochs)
        out["actors"] = stream.num_actors
    out["first"][0] += actors_up  # cold: from building the stream
    out.update(ray_up=ray_up, actors_up=actors_up)
    return out


def child(method: str, work: Path, epochs: int) -> dict:
    if method == "decode-1":
        return run_decode(work, epochs, 1)
    if method == "decode-all":
        return run_decode(work, epochs, cores())
    if method == "imagefolder":
        return run_imagefolder(work, epochs)
    if method == "webloader":
        return run_webloader(work, epochs)
    if method == "raydata":
        return run_raydata(work, epochs)
    if method == "shardstream":
        return run_shardstream(work, epochs, "shards")
    if method == "shardstream-4x":
        return run_shardstream(work, epochs, "shards4")
    raise ValueError(method)


# ---------------------------------------------------------------------- the parent
def measure(method: str, work: Path, epochs: int) -> dict:
    """Run one loader in a fresh process; its JSON result plus the tree's peak RSS."""
    cmd = [sys.executable, __file__, "--child", method, "--work", str(work),
           "--epochs", str(epochs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    peak, ps = (0, 0), psutil.Process(proc.pid)
    while proc.poll() is None:
        t = time.perf_counter()
        peak = tuple(map(max, peak, tree_memory(ps)))
        # reading smaps of a dozen Ray processes every 50 ms took half a core from the
        # loader being measured: keep the sampler under ~5% of one core
        time.sleep(max(0.05, 20 * (time.perf_counter() - t)))
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (err.strip().splitlines() or ["no output"])[-1][:200]}
    result = json.loads(lines[-1])
    result["peak_rss"], result["peak_pss"] = peak
    return result


def report(results: dict, n_cores: int) -> str:
    base = results.get("shardstream", {})
    rate = lambda r: r["images"] / r["seconds"]  # noqa: E731
    rows = ["| loader | images/s | per core | vs ShardStream | first batch cold / warm (s) "
            "| peak RSS / PSS (GB) |", "|---|---:|---:|---:|---:|---:|"]
    for method, r in results.items():
        if "error" in r:
            rows.append(f"| {method} | failed: {r['error']} | | | | |")
            continue
        ratio = f"{rate(r) / rate(base):.2f}x" if "images" in base else "-"
        cold, warm = r["first"]
        first = f"{cold:.2f} / {warm:.2f}" if warm is not None else f"{cold:.2f} / -"
        per_core = rate(r) / r.get("cores", n_cores)
        rows.append(f"| {method} | {rate(r):,.0f} | {per_core:,.0f} | {ratio} | "
                    f"{first} | {r['peak_rss'] / 1e9:.2f} / {r['peak_pss'] / 1e9:.2f} |")
    return "\n".join(rows)


def targets(results: dict) -> str:
    """The issue's targets, each with the measured value and met / missed."""
    ok = lambda r: "images" in r  # noqa: E731
    rate = lambda m: results[m]["images"] / results[m]["seconds"]  # noqa: E731
    if not ok(results.get("shardstream", {})):
        return "ShardStream did not run: no targets to check"
    lines = []
    for peer, want in (("imagefolder", 1.5), ("webloader", 2.0), ("decode-all", 0.85)):
        if ok(results.get(peer, {})):
            got = rate("shardstream") / rate(peer)
            lines.append(f"- ShardStream / {peer}: {got:.2f}x (target >= {want}x): "
                         f"{'met' if got >= want else 'missed'}")
    cold, warm = results["shardstream"]["first"]
    up = results["shardstream"]["actors_up"]
    lines.append(f"- ShardStream first batch: {warm:.2f} s at the start of an epoch, "
                 f"{cold - up:.2f} s after its actors are up (target < 1 s): "
                 f"{'met' if max(warm, cold - up) < 1 else 'missed'}; {cold:.2f} s cold from "
                 f"building the stream with Ray up, of which {up:.2f} s is starting the actor "
                 "processes (importing torch + torchvision)")
    if ok(results.get("shardstream-4x", {})):
        one, four = results["shardstream"], results["shardstream-4x"]
        ratio = four["peak_rss"] / one["peak_rss"]
        lines.append(f"- peak RSS 4x data / 1x data: {ratio:.2f} (PSS "
                     f"{four['peak_pss'] / one['peak_pss']:.2f}; target within +-15%): "
                     f"{'met' if abs(ratio - 1) <= 0.15 else 'missed'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tench-stream-bench"))
    parser.add_argument("--only", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every loader this many times, interleaved; keep each one's "
                             "fastest (on a shared machine the slow runs measure the others)")
    parser.add_argument("--ray-settle", type=float, default=0.0,
                        help="seconds between ray.init and building a ShardStream")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.epochs)), flush=True)
        return 0
    os.environ["STREAM_BENCH_RAY_SETTLE"] = str(args.ray_settle)  # the children read it
    prepare(args.work, args.images)
    n_cores = cores()
    results: dict = {}
    for _ in range(args.rounds):
        for method in args.only:
            load = os.getloadavg()[0]
            r = measure(method, args.work, args.epochs)
            r["load_before"] = round(load, 2)
            print(f"{method}: {r}", flush=True)
            best = results.get(method, {})
            if "images" not in best or ("images" in r and r["images"] / r["seconds"]
                                        > best["images"] / best["seconds"]):
                results[method] = r
    print(f"\n{args.images} images, {SIZE} px uint8 batches of {BATCH}, {n_cores} cores, "
          f"{args.epochs} epochs (images/s from the last), best of {args.rounds}\n")
    print(report(results, n_cores))
    print()
    print(targets(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
