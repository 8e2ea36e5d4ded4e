"""The script `ray submit` runs on the head node: `tench fit` on the cluster it runs in.

    ray submit ray_cluster.yaml trainer/submit.py -- SHARDS --out RUN --workers-per-node 1 --gpu

`ray submit` copies this one file to the head node and runs it there with Python, so it
imports tench from the installed package (the cluster's `setup_commands` install it),
never from files beside it. Its arguments are `tench fit`'s; it joins the running
cluster (`RAY_ADDRESS`, else "auto") and trains data-parallel, one worker per node
unless `--num-workers` or `--workers-per-node` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer import fit  # the installed tench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="submit.py", description=__doc__.splitlines()[0])
    fit.add_arguments(parser)  # tench fit's options, --num-workers/--workers-per-node included
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not hasattr(args, "address"):  # join the cluster this script was submitted to
        args.address = os.environ.get("RAY_ADDRESS") or "auto"
    if not args.num_workers and not args.workers_per_node:
        args.workers_per_node = 1
    return fit.main(args)


if __name__ == "__main__":
    sys.exit(main())
