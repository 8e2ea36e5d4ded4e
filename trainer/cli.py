"""`tench`: one command, with a subcommand per step of the data path.

Each subcommand lives in the module that owns its idea and exposes
`add_arguments(parser)` and `main(args) -> int`; this file only dispatches, importing
the chosen module alone so `tench shard` does not pay for torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "sample": ("shards.sample", "write an offline, folder-labelled sample image set"),
    "shard": ("shards.sharder", "labelled images (folders, file names or a CSV) -> tar shards"),
    "inspect": ("shards.inspect", "summarise a shards folder and check it against meta.json"),
    "fit": ("trainer.fit", "train a model on shards, streaming them through Ray"),
    "predict": ("trainer.predict", "predict classes of images or a shards split with a run"),
    "interpret": ("trainer.interpret", "confusion matrix, top losses, per-class scores of a run"),
    "export": ("trainer.export", "export a run's model as a torch.export program + JSON"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        code = int(args._module.main(args) or 0)
        sys.stdout.flush()  # a block-buffered stdout (a pipe) meets the closed pipe here
        return code
    except BrokenPipeError:
        # The reader went away (`tench inspect OUT | head`): stop quietly, as Unix tools do.
        # stdout now points at /dev/null so Python's flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as the shell reports it


if __name__ == "__main__":
    sys.exit(main())
