"""Scaling on a local multi-node Ray cluster, and the CPU cores an H100 needs to stay fed.

    .venv/bin/python bench/scale_bench.py [--per-class 30] [--size 128]

Starts `ray.cluster_utils.Cluster` (a head and two worker nodes on 127.0.0.1), then measures
images/s of `ShardStream` with 1, 2 and 4 actors spread over the nodes (`placement="spread"`),
and of data-parallel `tench fit` (`run_distributed`, course CNN) with 1 and 2 Ray Train
workers (second epoch, so start-up is not counted). From the one-actor rate (about one
core's decode + augment rate) it prints the cores per GPU needed to feed an H100 at
assumed training throughputs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import cores

# Assumed H100 training throughput at 128 px, images/s (bf16, channels_last, one GPU):
# xresnet50 ~ ResNet-50 at 224 px runs ~3,000 img/s on an H100 with AMP; at 128 px the
# work is (128/224)^2 = 0.33x, so ~9,000 img/s. The course CNN (5 small conv layers) is
# bound by input, not compute: ~50,000 img/s is a conservative figure for it.
H100_IMAGES_PER_S = {"course cnn": 50_000, "xresnet50": 9_000}


def stream_rate(shards: str, actors: int, size: int, rounds: int = 2) -> tuple[float, int]:
    """(best images/s, nodes the actors ran on) with `actors` actors spread over the nodes."""
    from pipeline.stream import ShardStream

    with ShardStream(shards, "train", batch_size=64, size=size, num_actors=actors,
                     placement="spread") as stream:
        next(iter(stream))  # actors started and warm
        nodes = len(set(stream.actor_nodes()))
        best = 0.0
        for _ in range(rounds):
            start, n = time.perf_counter(), 0
            for batch in stream:
                n += len(batch.keys)
            best = max(best, n / (time.perf_counter() - start))
    return best, nodes


def fit_rate(shards: str, out: str, workers: int, size: int) -> float:
    from trainer.config import FitConfig
    from trainer.distributed import ClusterOptions, run_distributed

    config = FitConfig(shards=shards, out=out, arch="cnn", epochs=2, batch_size=32,
                       size=size, actors=1)
    run_distributed(config, ClusterOptions(num_workers=workers, placement="spread"))
    history = json.loads((Path(out) / "metrics.json").read_text())
    from shards.format import read_meta

    meta = read_meta(shards)
    n = meta["splits"]["train"]["count"] + meta["splits"]["valid"]["count"]
    return n / history[-1]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from shards.sample import make_sample
    from shards.sharder import shard_folder

    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    make_sample(work / "images", per_class=args.per_class, seed=0)
    shard_folder(work / "images", work / "shards", processes=2, progress=False)
    shards = str(work / "shards")
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        streams = {a: stream_rate(shards, a, args.size) for a in (1, 2, 4)}
        fits = {w: fit_rate(shards, str(work / f"fit{w}"), w, args.size) for w in (1, 2)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\nlocal cluster: head (1 CPU) + 2 nodes (2 CPUs each) on a {cores()}-core machine, "
          f"{args.size} px, {args.per_class * 10} training images\n")
    print("| what | images/s | vs 1 |\n|---|---:|---:|")
    one = streams[1][0]
    for a, (rate, nodes) in streams.items():
        print(f"| ShardStream, {a} actor(s) spread over {nodes} node(s) | {rate:,.0f} | "
              f"{rate / one:.2f}x |")
    for w, rate in fits.items():
        print(f"| tench fit (cnn, CPU), {w} Ray Train worker(s) | {rate:,.0f} | "
              f"{rate / fits[1]:.2f}x |")
    per_core = one
    print(f"\nsingle-core decode + augment rate (1 actor): {per_core:,.0f} images/s\n")
    print("| model on one H100 (assumed img/s at 128 px) | CPU cores to feed it |\n|---|---:|")
    for name, need in H100_IMAGES_PER_S.items():
        print(f"| {name} ({need:,}) | {need / per_core:,.0f} |")


if __name__ == "__main__":
    main()
