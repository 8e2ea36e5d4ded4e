"""Time to accuracy, side by side: `tench fit` with its defaults vs the plain PyTorch loop.

For each data set (the demo's drawn shapes, `tench sample`; a set of real photographs,
bench/photo_set.py) and each seed, one fresh process trains with `tench fit` (on the
shards `tench shard` made of the images) and one with bench/plain_loop.py (torchvision's
ImageFolder over the same images), the same model class, epochs, image size and
augmentation. Both write a metrics.json row per epoch; this script polls it (every 0.05 s)
and the process tree's memory (every second), so "time to X%" is the wall time from
launching the process (imports, Ray's start-up and all) to the moment the first epoch whose
validation accuracy reached X% was written.

    python bench/accuracy_bench.py [--sets demo,photos] [--per-class 300] [--epochs N]
        [--seeds 0,1,2] [--work DIR] [--tench-args "--actors 2"]

Prints one table per set (means over the seeds) and writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import tree_memory  # noqa: E402
from photo_set import make_photo_set  # noqa: E402

from shards.sample import make_sample  # noqa: E402
from shards.sharder import shard_folder  # noqa: E402
from trainer.config import FitConfig  # noqa: E402

THRESHOLDS = (0.8, 0.9)
TOOLS = ("tench", "plain")


# ---------------------------------------------------------------------- data
def prepare(work: Path, name: str, per_class: int) -> tuple[Path, Path]:
    """(images folder, shards folder) of set `name`, made once per --per-class."""
    root = work / f"{name}-{per_class}"
    images, shards = root / "images", root / "shards"
    if not (shards / "meta.json").is_file():
        if name == "demo":
            make_sample(images, per_class=per_class, seed=0, force=True)
        elif name == "photos":
            make_photo_set(images, per_class=per_class, seed=0)
        else:
            raise SystemExit(f"unknown set {name!r}: demo or photos")
        shard_folder(images, shards, progress=False)
    return images, shards


# ---------------------------------------------------------------------- one run
def command(tool: str, images: Path, shards: Path, out: Path, epochs: int, seed: int,
            tench_args: list[str]) -> list[str]:
    if tool == "tench":
        return [sys.executable, "-m", "trainer.cli", "fit", str(shards), "--out", str(out),
                "--force", "--epochs", str(epochs), "--seed", str(seed), *tench_args]
    return [sys.executable, str(ROOT / "bench" / "plain_loop.py"), str(images), "--out",
            str(out), "--stats", str(shards / "meta.json"), "--epochs", str(epochs),
            "--seed", str(seed)]


def watch(cmd: list[str], out: Path, log: Path) -> dict:
    """Run `cmd` to its end, noting when each metrics row appears and the peak memory."""
    metrics = out / "metrics.json"
    metrics.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        ps = psutil.Process(proc.pid)
        arrivals: list[float] = []  # seconds since launch at which row i was seen
        rows: list[dict] = []
        peak_rss = peak_pss = 0
        last_mem, last_mtime = 0.0, None
        while True:
            done = proc.poll() is not None
            now = time.perf_counter() - start
            try:
                mtime = metrics.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime is not None and mtime != last_mtime:
                last_mtime = mtime
                rows = json.loads(metrics.read_text())
                arrivals += [now] * (len(rows) - len(arrivals))
            if done:
                break
            if now - last_mem >= 1.0:
                last_mem = now
                rss, pss = tree_memory(ps)
                peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return summarise(rows, arrivals, wall, peak_rss, peak_pss)


def summarise(rows: list[dict], arrivals: list[float], wall: float, rss: int, pss: int) -> dict:
    seconds = sum(r["seconds"] for r in rows)
    images = sum(r["images_per_s"] * r["seconds"] for r in rows)
    reached = {f"to_{round(t * 100)}": next((a for r, a in zip(rows, arrivals, strict=True)
                                             if r["accuracy"] >= t), None)
               for t in THRESHOLDS}
    return {"wall_s": round(wall, 2), **reached, "final_accuracy": rows[-1]["accuracy"],
            "accuracies": [r["accuracy"] for r in rows], "arrivals": arrivals,
            "images_per_s": round(images / seconds, 1),
            "data_wait_share": round(sum(r["data_wait"] for r in rows) / seconds, 4),
            "peak_rss_mb": round(rss / 2**20), "peak_pss_mb": round(pss / 2**20)}


# ---------------------------------------------------------------------- report
def mean(values: list) -> float | None:
    """Mean over the seeds; None unless every seed has a value (a threshold never reached)."""
    return None if not values or any(v is None for v in values) else statistics.mean(values)


def table(name: str, runs: dict) -> str:
    def cell(value, fmt="{:.1f}"):
        return "not reached" if value is None else fmt.format(value)

    keys = [f"to_{round(t * 100)}" for t in THRESHOLDS]
    lines = [f"### {name}", "",
             "| measure | tench fit | plain PyTorch | tench / plain |", "|---|---:|---:|---:|"]
    labels = {"to_80": "wall s to 80% valid acc", "to_90": "wall s to 90% valid acc",
              "wall_s": "wall s, whole run", "final_accuracy": "final valid accuracy",
              "images_per_s": "training images/s", "data_wait_share": "data-wait share",
              "peak_rss_mb": "peak RSS, process tree (MB)", "peak_pss_mb": "peak PSS (MB)"}
    for key in [*keys, "wall_s", "final_accuracy", "images_per_s", "data_wait_share",
                "peak_rss_mb", "peak_pss_mb"]:
        t, p = (mean([r[key] for r in runs[tool]]) for tool in TOOLS)
        fmt = "{:.3f}" if key in ("final_accuracy", "data_wait_share") else "{:.1f}"
        ratio = None if t is None or p is None or p == 0 else t / p
        lines.append(f"| {labels[key]} | {cell(t, fmt)} | {cell(p, fmt)} | "
                     f"{cell(ratio, '{:.2f}') if ratio is not None else '-'} |")
    return "\n".join(lines)


def main() -> None:
    d = FitConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="demo,photos")
    p.add_argument("--per-class", type=int, default=300, help="training images per class")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", type=Path, default=Path("/tmp/tench-accuracy-bench"))
    p.add_argument("--tench-args", default="", help="extra `tench fit` options, quoted")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {"epochs": args.epochs, "per_class": args.per_class, "seeds": seeds,
                     "tench_args": args.tench_args, "cores": len(os.sched_getaffinity(0)),
                     "sets": {}}
    for name in args.sets.split(","):
        images, shards = prepare(args.work, name, args.per_class)
        runs: dict = {tool: [] for tool in TOOLS}
        for i, seed in enumerate(seeds):
            order = TOOLS if i % 2 == 0 else TOOLS[::-1]  # alternate who runs first
            for tool in order:
                out = args.work / "runs" / f"{name}-{tool}-{seed}"
                cmd = command(tool, images, shards, out, args.epochs, seed,
                              shlex.split(args.tench_args))
                out.mkdir(parents=True, exist_ok=True)
                result = watch(cmd, out, args.work / "runs" / f"{name}-{tool}-{seed}.log")
                runs[tool].append(result)
                print(f"{name} {tool} seed {seed}: {json.dumps(result)}", flush=True)
        results["sets"][name] = runs
        print("\n" + table(name, runs) + "\n", flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
