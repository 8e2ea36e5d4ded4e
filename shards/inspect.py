"""`tench inspect OUT`: what a shards folder holds, and whether its shards match meta.json.

Prints the vocab, the images and shards of each split, bytes, the mean/std statistics and
the skipped files by reason; then reads every shard once, checking its size, sha256 and
sample count against `meta.json` and that every sample has an image, a label and an info
member. Any mismatch is named (which shard, what differs) and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shards.atomic import TMP_SUFFIX
from shards.format import (
    IMAGE_EXTS,
    INFO_EXT,
    LABEL_EXT,
    META_NAME,
    ShardFormatError,
    read_meta,
)
from shards.meta import human_bytes, skipped_by_reason

SHOWN = 10  # shards and skipped files listed per section unless --all
READ_BLOCK = 1 << 20


@dataclass
class ShardCheck:
    """What reading one shard found; `problems` is empty when it matches meta.json."""

    name: str
    problems: list[str]


class _HashingReader:
    """A read-only file that hashes and counts what is read through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def check_shard(folder: Path, entry: dict, vocab_size: int) -> ShardCheck:
    """Read `folder/<entry name>` once: size, sha256, sample count and members of each sample."""
    name = entry["name"]
    path = folder / name
    problems: list[str] = []
    if not path.is_file():
        return ShardCheck(name, [f"{path}: missing (meta.json lists it)"])
    samples: dict[str, set[str]] = {}
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, set()).add(ext)
                    if ext == LABEL_EXT:
                        problems += _label_problem(path, key, tar.extractfile(member), vocab_size)
        except (tarfile.TarError, EOFError, OSError) as e:
            problems.append(f"{path}: not a complete tar file ({e})")
        while reader.read(READ_BLOCK):  # the end-of-archive blocks count in size and hash
            pass
    if reader.size != entry["bytes"]:
        problems.append(f"{path}: {reader.size:,} bytes, meta.json says {entry['bytes']:,}")
    elif reader.sha.hexdigest() != entry["sha256"]:
        problems.append(
            f"{path}: sha256 {reader.sha.hexdigest()[:16]}…, meta.json says "
            f"{entry['sha256'][:16]}…"
        )
    if len(samples) != entry["count"]:
        problems.append(f"{path}: {len(samples)} samples, meta.json says {entry['count']}")
    for key, exts in samples.items():
        images = [e for e in exts if e in IMAGE_EXTS]
        if len(images) != 1 or LABEL_EXT not in exts or INFO_EXT not in exts:
            problems.append(f"{path}: sample {key} has members {sorted(exts)}; expected one "
                            f"image, {LABEL_EXT} and {INFO_EXT}")
            break
    return ShardCheck(name, problems)


def _label_problem(path: Path, key: str, f, vocab_size: int) -> list[str]:
    text = f.read().decode("ascii", "replace").strip() if f is not None else ""
    if not text.isdigit() or int(text) >= vocab_size:
        return [f"{path}: sample {key} has label {text!r}, not an index below {vocab_size}"]
    return []


def inspect_folder(folder: str | Path, *, verify: bool = True, show_all: bool = False,
                   write=print) -> list[str]:
    """Print the summary of `folder`; return the problems found (empty: all match)."""
    folder = Path(folder)
    meta = read_meta(folder)
    vocab = meta["vocab"]
    write(f"{folder}: format {meta['format_version']}, made by "
          f"{meta.get('created_by', '?')}, layout {meta.get('layout', '?')}")
    shown = vocab if show_all or len(vocab) <= 20 else [*vocab[:20], "…"]
    write(f"vocab: {len(vocab)} labels (fingerprint {meta['vocab_fingerprint'][:12]}…): "
          f"{', '.join(shown)}")
    stats = meta["stats"]
    write(f"stats: mean {_floats(stats['mean'])}, std {_floats(stats['std'])} (0-1 scale, "
          f"{stats.get('images', '?')} training images)")
    problems: list[str] = []
    for split, info in meta["splits"].items():
        entries = info["shards"]
        n_bytes = sum(s["bytes"] for s in entries)
        write(f"{split}: {info['count']:,} images in {len(entries)} shards, "
              f"{human_bytes(n_bytes)}")
        if sum(s["count"] for s in entries) != info["count"]:
            problems.append(f"meta.json: {split} count {info['count']} is not the sum of its "
                            "shard counts")
        for i, entry in enumerate(entries):
            status = ""
            if verify:
                check = check_shard(folder, entry, len(vocab))
                problems += check.problems
                status = "  ok" if not check.problems else "  MISMATCH"
            if show_all or i < SHOWN or status.strip() == "MISMATCH":
                write(f"  {entry['name']}  {entry['count']:>6,} images  "
                      f"{human_bytes(entry['bytes']):>9}{status}")
            elif i == SHOWN:
                write(f"  … {len(entries) - SHOWN} more (--all lists them)")
    if meta.get("formats"):
        write("formats: " + ", ".join(f"{k} {v:,}" for k, v in meta["formats"].items()))
    _write_skipped(meta["skipped"], show_all, write)
    listed = {s["name"] for info in meta["splits"].values() for s in info["shards"]}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".tar") and path.name not in listed:
            write(f"note: {path.name} is not listed in {META_NAME} (not part of this run)")
        if path.name.startswith(".") and path.name.endswith(TMP_SUFFIX):
            write(f"note: {path.name} is a temporary file of an interrupted run; "
                  "`tench shard --force` removes it")
    if verify:
        n = len(listed)
        write(f"checked {n} shards against {META_NAME}: "
              + ("sizes, sha256, counts and members match" if not problems
                 else f"{len(problems)} problems"))
    return problems


def _write_skipped(skipped: list[dict], show_all: bool, write) -> None:
    if not skipped:
        write("skipped: none")
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in skipped_by_reason(skipped).items())
    write(f"skipped {len(skipped)} files: {kinds}")
    for entry in skipped if show_all else skipped[:SHOWN]:
        write(f"  {entry['path']}: {entry['reason']}")
    if not show_all and len(skipped) > SHOWN:
        write(f"  … {len(skipped) - SHOWN} more (--all lists them)")


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", type=Path, help="a folder made by `tench shard`")
    parser.add_argument("--all", action="store_true", dest="show_all",
                        help="list every shard and every skipped file")
    parser.add_argument("--no-verify", action="store_true",
                        help="only read meta.json; do not read the shards")


def main(args: argparse.Namespace) -> int:
    try:
        problems = inspect_folder(args.out, verify=not args.no_verify, show_all=args.show_all)
    except ShardFormatError as e:
        print(f"tench inspect: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"tench inspect: {problem}", file=sys.stderr)
    if problems:
        print(f"tench inspect: {args.out} does not match its {META_NAME}; re-run "
              "`tench shard --force` to rebuild it", file=sys.stderr)
        return 1
    return 0
