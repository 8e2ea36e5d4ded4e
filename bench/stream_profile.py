"""Where a ShardStream's time goes: batch-size / per-object sweeps and per-process CPU shares.

    .venv/bin/python bench/stream_profile.py sweep [--batch-sizes 32 64 128 256] [--per-call 1]
    .venv/bin/python bench/stream_profile.py sweep --batch-sizes 64 --per-call 1 2 4
    .venv/bin/python bench/stream_profile.py shares [--seconds 16] [--per-call 1] [--actors 3]

Uses `bench/stream_bench.py`'s images and shards (`--work`, made there if missing; `--images`),
128 px uint8 batches, all cores, the default number of actors.

- sweep: images/s over one epoch after a warm-up epoch, for each batch size and each number
  of batches per actor call (one Ray object), in interleaved rounds, best of `--rounds`.
  Ray's cost is per object, not per byte: bigger objects, more images/s (`pipeline/settings.py`).
- shares: the stream run epoch after epoch on 4x the data (`shards4`); after a warm-up, the
  CPU time each process of the tree (this driver, actors, raylet, GCS, Ray's agents) used over
  `--seconds`, as a share of one core, and the machine's idle share.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream_bench import SIZE, prepare  # noqa: E402


def stream_rate(work: Path, folder: str, batch_size: int, per_call: int) -> float:
    """images/s of the second epoch of a fresh ShardStream."""
    from pipeline.stream import ShardStream

    with ShardStream(work / folder, "train", batch_size=batch_size, size=SIZE,
                     batches_per_call=per_call) as stream:
        for epoch in range(2):
            stream.set_epoch(epoch)
            start, images = time.perf_counter(), 0
            for batch in stream:
                images += len(batch.labels)
        return images / (time.perf_counter() - start)


def sweep(work: Path, batch_sizes: list[int], per_calls: list[int], rounds: int) -> None:
    from pipeline.stream import ensure_ray

    ensure_ray()
    best: dict = defaultdict(float)
    for r in range(rounds):
        for bs in batch_sizes:
            for per_call in per_calls:
                rate = stream_rate(work, "shards", bs, per_call)
                best[bs, per_call] = max(best[bs, per_call], rate)
                mb = bs * per_call * SIZE * SIZE * 3 / 2**20
                print(f"round {r}: batch {bs}, {per_call} per call ({mb:.0f} MB per object): "
                      f"{rate:,.0f} images/s", flush=True)
    print(f"\nbest of {rounds} (load average {psutil.getloadavg()[0]:.1f})")
    print(f"{'batch':>6}{'per call':>10}{'MB/object':>11}{'images/s':>10}")
    for (bs, per_call), rate in best.items():
        mb = bs * per_call * SIZE * SIZE * 3 / 2**20
        print(f"{bs:>6}{per_call:>10}{mb:>11.0f}{rate:>10,.0f}")


def process_kind(proc: psutil.Process, actor_pids: set[int], me: int) -> str:
    if proc.pid == me:
        return "training process (driver)"
    if proc.pid in actor_pids:
        return f"actor {proc.pid}"
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env",
                 "monitor.py", "plasma"):
        if name in line:
            return "raylet" if name == "raylet" else f"Ray {name}"
    return "other Ray worker" if "default_worker" in line else "other"


def shares(work: Path, seconds: float, warmup: float, per_call: int | None,
           actors: int | None) -> None:
    """Per-process CPU over `seconds` of a stream kept running in a thread."""
    from pipeline.stream import ShardStream, ensure_ray

    ensure_ray()
    stop = threading.Event()
    counted = [0]
    with ShardStream(work / "shards4", "train", batch_size=64, size=SIZE,
                     batches_per_call=per_call, num_actors=actors) as stream:
        actor_pids = set(stream.actor_pids())

        def consume() -> None:
            epoch = 0
            while not stop.is_set():
                stream.set_epoch(epoch)
                for batch in stream:
                    counted[0] += len(batch.labels)
                    if stop.is_set():
                        break
                epoch += 1

        worker = threading.Thread(target=consume, daemon=True)
        worker.start()
        time.sleep(warmup)
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        procs += [psutil.Process(p) for p in actor_pids if p not in {q.pid for q in procs}]

        def cpu(p: psutil.Process) -> float:
            try:
                t = p.cpu_times()
                return t.user + t.system
            except psutil.Error:
                return 0.0

        before = {p.pid: cpu(p) for p in procs}
        idle0, images0, t0 = psutil.cpu_times().idle, counted[0], time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - t0
        after = {p.pid: cpu(p) for p in procs}
        idle = (psutil.cpu_times().idle - idle0) / elapsed / psutil.cpu_count()
        images = counted[0] - images0
        stop.set()
        worker.join(timeout=60)
    by_kind: dict = defaultdict(float)
    for p in procs:
        by_kind[process_kind(p, actor_pids, me.pid)] += (after[p.pid] - before[p.pid]) / elapsed
    print(f"\n{images / elapsed:,.0f} images/s over {elapsed:.0f}s; share of one core per "
          f"process (load average {psutil.getloadavg()[0]:.1f}):")
    for kind, share in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<30}{share:>7.1%}")
    print(f"  {'machine idle (of all cores)':<30}{idle:>7.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("sweep", "shares"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tench-stream-bench"))
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--per-call", type=int, nargs="+", default=None,
                        help="batches per actor call (one Ray object); sweep: default 1, "
                             "shares: default the stream's (~12 MB), the first value given")
    parser.add_argument("--actors", type=int, default=None, help="shares: actors (default: cores)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=16.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    args = parser.parse_args()
    prepare(args.work, args.images)
    if args.what == "sweep":
        sweep(args.work, args.batch_sizes, args.per_call or [1], args.rounds)
    else:
        shares(args.work, args.seconds, args.warmup, (args.per_call or [None])[0], args.actors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
