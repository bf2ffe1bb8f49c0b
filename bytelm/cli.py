"""The `bytelm` command line: one subcommand per step of the data flow (see DESIGN.md).

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> int | None`. Modules are imported only when their subcommand runs, so
`bytelm --help` is instant and does not import torch.

A `UserError` (bad input) becomes one line on stderr and exit code 2; no traceback. So does
an OSError about a path the user gave or a disk the user owns (full, read-only, not
writable, not a folder): one line naming the path, exit code 1.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import time

from bytelm.errors import UserError

# When this process began the command, before importing torch: a time limit
# (train.time_limit_s) counts from here, startup and compilation included.
STARTED = time.time()

# OSErrors that are the user's file system's state, not a bug: reported in one line
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST, errno.ENOENT, errno.EFBIG, errno.ENAMETOOLONG, errno.EIO}

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("data_prep.prepare", "build a code corpus, train the BPE, write token shards"),
    "train": ("bytelm.train", "train a model with n future-token heads (resumes a run directory)"),
    "eval": ("bytelm.evaluation.cli", "pass@k on HumanEval / MBPP / APPS for a checkpoint or a samples file"),
    "decode-bench": ("bytelm.decode_bench", "self-speculative decoding benchmark (speedup, bytes per forward)"),
    "sweep": ("experiments.sweep", "run a study: a grid of configurations as MLflow child runs"),
    "report": ("analysis.report", "n-ablation tables and plots from an MLflow experiment"),
    "track": ("bytelm.tracking_cli", "MLflow utilities: import run directories made offline"),
    "synth": ("data_prep.synthetic_cli", "synthetic tasks: induction stories, polynomial arithmetic"),
    "demo": ("bytelm.demo", "the whole pipeline on the embedded corpus, tiny models, CPU, minutes"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bytelm",
        description="Multi-token prediction for byte-level and token-level language models of code.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        command = None
    parser = build_parser(load=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(0)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        rc = module.main(args)
    except UserError as e:
        print(f"bytelm {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        where += f" -> {e.filename2}" if e.filename2 else ""
        print(f"bytelm {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"bytelm {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)
