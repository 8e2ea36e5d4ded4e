"""Shards over a slow network: images/s of epoch 1 and 2, with and without a local cache.

    .venv/bin/python bench/remote_bench.py [--images 3000] [--shards 8] [--latency-ms 50]
                                           [--mbps 20] [--workers N] [--work DIR] [--quick]

One run makes a `tench sample` set (160 px, 9 in 10 JPEG), shards it with `tench shard`,
serves the shards folder from `bench/throttled_http.py` (its own process, on 127.0.0.1:
every request waits `--latency-ms` before its first byte, every connection is capped at
`--mbps` MB/s, like a bucket in object storage), then plays two epochs of each row:

    tench-disk   ShardStream over the shards folder on local disk: the ceiling, no network
    tench-http   ShardStream over http://, no cache: every epoch streams from the server
    tench-cache  ShardStream over http:// with cache_dir: epoch 1 fetches each shard once
                 (verified against meta.json's sha256), epoch 2 reads the local copies
    wds-http     webdataset WebDataset(urls) + WebLoader: streams each shard through curl
    wds-cache    webdataset WebDataset(urls, cache_dir=...) + WebLoader: its own cached URL
                 loader (downloads a shard whole through curl, then reads the local file)

Every row makes 128 px uint8 batches of 64 with the same per-item work (tench's decode +
random-resized crop + flip: `pipeline.decode`, `pipeline.transforms.train_tfms`), shuffles
shards and a 1000-record buffer, and uses `--workers` processes (ShardStream's actors,
WebLoader's workers; default one per core), so the rows differ in how the bytes arrive
(and in tench's checks: CRC32 per record, sha256 per cached shard). images/s is one whole
epoch, from asking for its first batch to its last (the stream's actors are up before; the
WebLoader's workers start inside each epoch, as they do in training). The server's counts
say what each epoch fetched. The webdataset rows run first, before Ray starts in this
process, so its workers fork from a process without Ray's threads.

Why 20 MB/s per connection by default: on these 2 cores the per-item work runs at ~2-4k
images/s, ~40-80 MB/s of ~20 KB records, so two capped connections (~40 MB/s) make the
network the limit, as on a GPU node whose many cores decode faster than a bucket's ~50-100
MB/s per connection deliver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cores  # noqa: E402
from stream_bench import BATCH, SIZE, tench_item  # noqa: E402

import pipeline.decode  # noqa: E402, F401 - imported here, so WebLoader's workers fork with it
import pipeline.transforms  # noqa: E402, F401

ROWS = ("tench-disk", "tench-http", "tench-cache", "wds-http", "wds-cache")
BASELINE = ("tench-http", 1)  # the row and epoch every ratio is against


# ---------------------------------------------------------------------- data and server
def prepare(work: Path, images: int, shards: int) -> Path:
    """`work/images` (`tench sample`) and `work/shards` (`tench shard`, about `shards` shards)."""
    from shards.sample import make_sample
    from shards.sharder import shard_folder

    images_dir, shards_dir = work / f"images-{images}", work / f"shards-{images}-{shards}"
    if not (images_dir / "train").exists():
        t = time.perf_counter()
        make_sample(images_dir, per_class=images // 10, valid_per_class=1, force=True)
        print(f"made {images} images in {time.perf_counter() - t:.0f}s", flush=True)
    if not (shards_dir / "meta.json").exists():
        # by count, not size: exactly `shards` train shards of equal length
        shard_folder(images_dir, shards_dir, shard_size=1 << 40, max_count=-(-images // shards),
                     progress=False)
    return shards_dir


def start_server(folder: Path, latency_ms: float, mbps: float) -> tuple[subprocess.Popen, str]:
    """`bench/throttled_http.py` in its own process; it prints its URL first."""
    cmd = [sys.executable, str(Path(__file__).with_name("throttled_http.py")), str(folder),
           "--latency-ms", str(latency_ms), "--mbps", str(mbps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"the throttled server did not start (printed {url!r})")
    return proc, url


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/_stats", timeout=10) as r:
        return json.loads(r.read())


def train_shards(folder: Path) -> list[str]:
    meta = json.loads((folder / "meta.json").read_text())
    return [s["name"] for s in meta["splits"]["train"]["shards"]]


# ---------------------------------------------------------------------- the rows
def wds_item(sample: dict) -> tuple:
    ext = "jpg" if "jpg" in sample else "png"
    return tench_item(sample[ext], ext, np.random.default_rng()), int(sample["cls"])


def play(batches, epochs: int, url: str) -> list[dict]:
    """Time `epochs` passes over `batches()`, each with what the server sent meanwhile."""
    out = []
    for _ in range(epochs):
        before = server_stats(url)
        t = time.perf_counter()
        n = sum(len(images) for images in batches())
        seconds = time.perf_counter() - t
        after = server_stats(url)
        out.append({"images": n, "seconds": seconds,
                    **{k: after[k] - before[k] for k in after}})
    return out


def run_wds(urls: list[str], cache_dir: Path | None, epochs: int, url: str, workers: int
            ) -> list[dict]:
    import webdataset as wds

    ds = (wds.WebDataset(urls, shardshuffle=100, cache_dir=str(cache_dir) if cache_dir else None)
          .shuffle(1000).map(wds_item).batched(BATCH))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    return play(lambda: (images for images, _labels in loader), epochs, url)


def run_tench(source: str, cache_dir: Path | None, epochs: int, url: str, workers: int
              ) -> list[dict]:
    from pipeline.stream import ShardStream

    with ShardStream(source, "train", batch_size=BATCH, size=SIZE, num_actors=workers,
                     cache_dir=str(cache_dir) if cache_dir else None) as stream:
        stream.actor_pids()  # the actors are up (they import torch) before the clock starts
        return play(lambda: (b.images for b in stream), epochs, url)


def run_row(row: str, shards_dir: Path, url: str, work: Path, epochs: int, workers: int
            ) -> list[dict]:
    cache = work / f"cache-{row}"
    shutil.rmtree(cache, ignore_errors=True)  # every cached row starts cold
    cache.mkdir(parents=True)
    if row.startswith("wds"):
        urls = [f"{url}/{name}" for name in train_shards(shards_dir)]
        return run_wds(urls, cache if row == "wds-cache" else None, epochs, url, workers)
    source = str(shards_dir) if row == "tench-disk" else url
    return run_tench(source, cache if row == "tench-cache" else None, epochs, url, workers)


# ---------------------------------------------------------------------- the report
def report(results: dict) -> str:
    rate = lambda e: e["images"] / e["seconds"]  # noqa: E731
    base_row, base_epoch = BASELINE
    base = results.get(base_row, [])
    base_rate = rate(base[base_epoch - 1]) if len(base) >= base_epoch else None
    lines = [f"| row | epoch | images/s | vs {base_row} epoch {base_epoch} | shard MB served "
             "| shard GETs | all GETs |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row, epochs in results.items():
        for i, e in enumerate(epochs, 1):
            ratio = f"{rate(e) / base_rate:.2f}x" if base_rate else "-"
            served = f"{e['tar_bytes'] / 1e6:,.1f}" if e["tar_bytes"] else "0"
            lines.append(f"| {row} | {i} | {rate(e):,.0f} | {ratio} | {served} | "
                         f"{e['tar_requests']} | {e['requests']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=8, help="about this many train shards")
    parser.add_argument("--latency-ms", type=float, default=50.0,
                        help="wait before each response's first byte")
    parser.add_argument("--mbps", type=float, default=20.0, help="MB/s per connection")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tench-remote-bench"))
    parser.add_argument("--workers", type=int, default=cores(),
                        help="ShardStream actors and WebLoader workers (default: the cores)")
    parser.add_argument("--only", nargs="*", choices=ROWS, default=list(ROWS))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 200 images in 4 shards, 1 worker (sets --images, "
                             "--shards, --workers)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.shards, args.workers = 200, 4, 1
    shards_dir = prepare(args.work, args.images, args.shards)
    data_mb = sum(p.stat().st_size for p in shards_dir.glob("train-*.tar")) / 1e6
    server, url = start_server(shards_dir, args.latency_ms, args.mbps)
    results: dict = {}
    try:
        # webdataset first: its workers fork from this process, which must not run Ray yet
        for row in sorted(args.only, key=lambda r: not r.startswith("wds")):
            load, t = os.getloadavg()[0], time.perf_counter()
            results[row] = run_row(row, shards_dir, url, args.work, args.epochs, args.workers)
            print(f"{row} (load {load:.1f}, {time.perf_counter() - t:.0f} s in all): "
                  f"{results[row]}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    results = {row: results[row] for row in ROWS if row in results}
    (args.work / "remote_bench.json").write_text(json.dumps(results, indent=1))
    print(f"\n{args.images} images ({len(train_shards(shards_dir))} train shards, "
          f"{data_mb:.1f} MB), {SIZE} px uint8 batches of {BATCH}, {cores()} cores, "
          f"{args.workers} actors / workers; server: {args.latency_ms:g} ms per request, "
          f"{args.mbps:g} MB/s per connection; one run\n")
    print("\n\n".join(__doc__.split("\n\n")[3:5]))
    print()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
