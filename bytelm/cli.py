"""The `bytelm` command line: one subcommand per step of the data flow
(docs/architecture.md).

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> int | None`. A command with subcommands of its own (`bytelm synth`) names
a module per subcommand, since building a data set (data_prep) and scoring a model on it
(bytelm) belong to different packages. Modules are imported only when their subcommand
runs, so `bytelm --help` is instant and does not import torch.

This is the one module of the library that imports the application folders (data_prep,
analysis), and it does so only to dispatch a command to them.

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

from bytelm.errors import Stopped, UserError

# When this process began the command, before importing torch: a time limit
# (train.time_limit_s) counts from here, startup and compilation included.
STARTED = time.time()

# OSErrors that are the user's file system's state, not a bug: reported in one line
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST, errno.ENOENT, errno.EFBIG, errno.ENAMETOOLONG, errno.EIO}

# name -> (module, one-line help); a command with subcommands maps each to (module, help)
COMMANDS: dict[str, tuple[str | dict[str, tuple[str, str]], str]] = {
    "prepare": ("data_prep.prepare", "build a code corpus, train the BPE, write token shards"),
    "train": ("bytelm.train", "train a model with n future-token heads (resumes a run directory)"),
    "eval": ("bytelm.evaluation.cli", "pass@k on HumanEval / MBPP / APPS for a checkpoint or a samples file"),
    "decode-bench": ("bytelm.decode_bench", "self-speculative decoding benchmark (speedup, bytes per forward)"),
    "tree-fit": ("bytelm.tree_fit", "the best trees of draft candidates for a checkpoint, from held-out text"),
    "sweep": ("bytelm.sweep.cli", "run a study: a grid of configurations as MLflow child runs"),
    "report": ("analysis.report", "n-ablation tables and plots from an MLflow experiment"),
    "track": ("bytelm.tracking_cli", "MLflow utilities: import run directories made offline"),
    "synth": ({
        "induction": ("data_prep.induction", "children's stories with random two-token names (paper §4.1)"),
        "poly": ("data_prep.polynomials", "polynomial arithmetic over F_7[X]/(X^5) (paper §4.2)"),
        "eval": ("bytelm.synthetic_eval", "score a trained model on a synthetic test set; log to its run"),
    }, "synthetic tasks: induction stories, polynomial arithmetic"),
    "demo": ("bytelm.demo", "the whole pipeline on the embedded corpus, tiny models, CPU, minutes"),
}


def _words(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    """The parser, with the arguments of the (sub)command named in argv loaded, and that
    command's module (None when argv names none)."""
    words = _words(argv)
    parser = argparse.ArgumentParser(
        prog="bytelm",
        description="Multi-token prediction for byte-level and token-level language models of code.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    for name, (target, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if isinstance(target, dict):
            inner = p.add_subparsers(dest=f"{name}_command", metavar="TASK", required=True)
            for sub_name, (module, sub_help) in target.items():
                q = inner.add_parser(sub_name, help=sub_help, description=sub_help)
                if words[:2] == [name, sub_name]:
                    chosen = module
                    importlib.import_module(module).add_arguments(q)
        elif words[:1] == [name]:
            chosen = target
            importlib.import_module(target).add_arguments(p)
    return parser, chosen


def check_overrides(argv: list[str]) -> None:
    """`--set model.n_future 8` (a space for the =) would reach argparse as a stray
    argument: say how to write it instead."""
    for flag, key, value in zip(argv, argv[1:], argv[2:] + [""]):
        if flag in ("--set", "--tag") and "=" not in key:
            example = f"{key}={value}" if value and not value.startswith("-") else f"{key}=VALUE"
            raise UserError(f"{flag} takes KEY=VALUE in one word: write {flag} {example}")


def run_command(argv: list[str]) -> int | None:
    """Parses argv and runs its command in this process; a UserError propagates."""
    check_overrides(argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 0
    return importlib.import_module(module).main(args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    name = " ".join(_words(argv)[:1])
    try:
        rc = run_command(argv)
    except UserError as e:
        print(f"bytelm {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"bytelm {name}: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        where += f" -> {e.filename2}" if e.filename2 else ""
        print(f"bytelm {name}: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"bytelm {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)
