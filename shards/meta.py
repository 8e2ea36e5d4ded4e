"""`meta.json` for a shards folder, and the human summary of a sharding run.

`meta.json` is written last and atomically, so a folder with one is a folder whose shards
are all complete. Its required keys are `shards.format.META_KEYS`; tench adds a few more
(`created_by`, `layout`, `source`, `options`, `formats`, `reencoded`) that tools may show
but must not rely on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shards.atomic import atomic_write_bytes
from shards.format import FORMAT_VERSION, META_NAME, SPLITS, json_bytes
from shards.images import histogram_stats
from shards.vocab import Vocab
from shards.writer import ShardInfo

CREATED_BY = "tench shard"


def build_meta(
    vocab: Vocab, shards: dict[str, list[ShardInfo]], histogram: np.ndarray,
    stats_images: int, skipped: list[dict], **extra,
) -> dict:  # fmt: skip
    """The `meta.json` object: format keys first, then `extra` (layout, options, ...).

    `histogram`: 768 RGB pixel counts of the `stats_images` training images sampled.
    """
    splits = {}
    for split in SPLITS:
        infos = shards.get(split, [])
        splits[split] = {
            "count": sum(s.count for s in infos),
            "shards": [s.to_json() for s in infos],
        }
    stats = histogram_stats(histogram)
    stats["images"] = stats_images
    return {
        "format_version": FORMAT_VERSION,
        **vocab.to_json(),
        "splits": splits,
        "stats": stats,
        "skipped": skipped,
        "created_by": CREATED_BY,
        **extra,
    }


def write_meta(folder: str | Path, meta: dict) -> Path:
    """Write `folder/meta.json` atomically (temp name, fsync, rename)."""
    path = Path(folder) / META_NAME
    atomic_write_bytes(path, json_bytes(meta, indent=1) + b"\n")
    return path


def reason_kind(reason: str) -> str:
    """"corrupt image: truncated ..." -> "corrupt image": the part before the first colon."""
    return reason.split(":", 1)[0]


def skipped_by_reason(skipped: Iterable[dict]) -> dict[str, int]:
    """How many files were skipped for each kind of reason, most common first."""
    return dict(Counter(reason_kind(s["reason"]) for s in skipped).most_common())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def summary_lines(meta: dict, seconds: float | None = None) -> list[str]:
    """The closing summary: per split images/shards/bytes, speed, skipped files by reason."""
    lines = []
    total = 0
    for split, info in meta["splits"].items():
        n_bytes = sum(s["bytes"] for s in info["shards"])
        total += info["count"]
        lines.append(
            f"{split:>5}: {info['count']:,} images in {len(info['shards'])} shards, "
            f"{human_bytes(n_bytes)}"
        )
    if seconds is not None:
        lines.append(f"{total:,} images in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} "
                     "images/s)")
    skipped = meta.get("skipped", [])
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in skipped_by_reason(skipped).items())
        lines.append(f"skipped {len(skipped)} files: {kinds} (paths and reasons in meta.json)")
    else:
        lines.append("skipped 0 files")
    return lines
