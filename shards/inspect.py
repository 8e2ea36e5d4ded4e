"""`tench inspect OUT`: what a shards folder holds, and whether its shards match meta.json.

Prints the vocab, the images and shards of each split, bytes, the mean/std statistics and
the skipped files by reason; then reads every shard once, checking its size, sha256 and
sample count against `meta.json` and every sample by the rule the stream applies
(`shards.format.sample_problem`: its members, and their CRC32s in format 2). Any mismatch
is named (which shard, which sample, what differs) and the exit status is 1.

OUT is a local folder or a URL (`http(s)://`, or `s3://` with the usual AWS settings),
read through `shards.remote`; shard names in `meta.json` are refused unless they are plain
file names, before anything is opened.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from shards.atomic import TMP_SUFFIX
from shards.format import (
    LABEL_EXT,
    META_NAME,
    ShardFormatError,
    read_meta,
    sample_problem,
    shown,
    split_member_name,
    validate_meta,
)
from shards.meta import human_bytes, skipped_by_reason
from shards.remote import HttpError, http_status, is_url, join, open_file, read_failure

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


def check_shard(location: str | Path, entry: dict, vocab_size: int) -> ShardCheck:
    """Read `location/<entry name>` once: size, sha256, sample count and every sample."""
    name = entry["name"]
    where = join(location, name)
    problems: list[str] = []
    try:
        raw = open_file(location, name)
    except FileNotFoundError as e:
        what = "missing" if http_status(e) in (None, 404) else read_failure(e)
        return ShardCheck(name, [f"{where}: {what} (meta.json lists it)"])
    except (OSError, HttpError) as e:
        return ShardCheck(name, [f"{where}: cannot open ({read_failure(e)})"])
    count = 0
    with raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for key, members in _samples(tar):
                    count += 1
                    problem = sample_problem(members)
                    if problem is not None:
                        problems.append(f"{where}: sample {key} {problem}")
                    if LABEL_EXT in members:
                        problems += _label_problem(where, key, members[LABEL_EXT], vocab_size)
            while reader.read(READ_BLOCK):  # the end-of-archive blocks count in size and hash
                pass
        except (tarfile.TarError, EOFError) as e:
            problems.append(f"{where}: not a complete tar file ({e})")
        except (OSError, HttpError) as e:
            problems.append(f"{where}: read failed ({read_failure(e)})")
            return ShardCheck(name, problems)
    if reader.size != entry["bytes"]:
        problems.append(f"{where}: {reader.size:,} bytes, meta.json says {entry['bytes']:,}")
    elif reader.sha.hexdigest() != entry["sha256"]:
        problems.append(
            f"{where}: sha256 {reader.sha.hexdigest()[:16]}…, meta.json says "
            f"{entry['sha256'][:16]}…"
        )
    if count != entry["count"]:
        problems.append(f"{where}: {count} samples, meta.json says {entry['count']}")
    return ShardCheck(name, problems)


def _samples(tar: tarfile.TarFile):
    """`(key, {ext: bytes})` per sample: consecutive members sharing a key, as the stream
    groups them."""
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        k, ext = split_member_name(member.name)
        if not ext:
            continue
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


def _label_problem(where: str, key: str, data: bytes, vocab_size: int) -> list[str]:
    text = data.decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) >= vocab_size:
        return [f"{where}: sample {key} has label {text!r}, not an index below {vocab_size}"]
    return []


def read_location_meta(location: str | Path) -> dict:
    """`meta.json` of a local folder or a URL, validated (shard names included)."""
    if not is_url(location):
        return read_meta(location)
    where = join(location, META_NAME)
    try:
        with open_file(location, META_NAME) as f:
            data = f.read()
    except FileNotFoundError as e:
        if http_status(e) in (None, 404):
            raise ShardFormatError(f"{where}: not found; is {location} a folder made by "
                                   "`tench shard`?") from None
        raise ShardFormatError(f"{where}: cannot read ({read_failure(e)})") from None
    except (OSError, HttpError) as e:
        raise ShardFormatError(f"{where}: cannot read ({read_failure(e)})") from None
    try:
        meta = json.loads(data)
    except ValueError as e:
        raise ShardFormatError(f"{where}: not valid JSON ({e})") from None
    return validate_meta(meta, where)


def inspect_folder(folder: str | Path, *, verify: bool = True, show_all: bool = False,
                   write=print) -> list[str]:
    """Print the summary of `folder` (a local folder or a URL); return the problems found
    (empty: all match)."""
    folder = str(folder).rstrip("/") if is_url(folder) else Path(folder)
    meta = read_location_meta(folder)
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
    for path in [] if is_url(folder) else sorted(folder.iterdir()):
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
        write(f"  {shown(entry['path'])}: {entry['reason']}")
    if not show_all and len(skipped) > SHOWN:
        write(f"  … {len(skipped) - SHOWN} more (--all lists them)")


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT",
                        help="a folder made by `tench shard`, or its http(s):// or s3:// URL")
    parser.add_argument("--all", action="store_true", dest="show_all",
                        help="list every shard and every skipped file")
    parser.add_argument("--no-verify", action="store_true",
                        help="only read meta.json; do not read the shards")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error, not just its sentence")


def main(args: argparse.Namespace) -> int:
    try:
        problems = inspect_folder(args.out, verify=not args.no_verify, show_all=args.show_all)
    except ShardFormatError as e:
        print(f"tench inspect: {e}", file=sys.stderr)
        return 2
    except (OSError, HttpError) as e:  # a folder we may not list, a disk error, a network
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"tench inspect: {args.out}: {read_failure(e)}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"tench inspect: {problem}", file=sys.stderr)
    if problems:
        print(f"tench inspect: {args.out} does not match its {META_NAME}; re-run "
              "`tench shard --force` to rebuild it", file=sys.stderr)
        return 1
    return 0
