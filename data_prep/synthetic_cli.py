"""`bytelm synth`: the synthetic tasks of the paper's §4 (docs/synthetic.md).

    bytelm synth induction --out DIR [--stories FILE] [--bpe-vocab N] [--seed S]
    bytelm synth poly --out DIR [--n-train N] [--test-per-m 2000] [--seed S]
    bytelm synth eval --task induction|poly --checkpoint RUN_DIR [--checkpoints latest|all] [--data DIR] [--json OUT]

`induction` and `poly` write a prepared-data folder (the layout of `bytelm prepare`, so
`bytelm train` reads it with data.root=DIR) plus the test sets in DIR/tests/. `eval`
scores a trained model on those test sets, prints the numbers, writes them as JSON and
logs them into the run's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tabulate import tabulate

from bytelm.errors import UserError
from bytelm.fileio import write_json

STORIES_FILE = "stories/tinystories_v2_gpt4_train_first2MiB.txt"
# the test metric that picks the oracle checkpoint (--checkpoints all), the first a task logs
ORACLE_METRICS = ("induction/acc", "induction/acc_bytes", "poly/acc_in_domain")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="synth_command", metavar="TASK", required=True)

    p = sub.add_parser("induction", help="children's stories with random two-token names (paper §4.1)")
    p.add_argument("--out", required=True, type=Path, help="output folder (a prepared-data folder)")
    p.add_argument("--stories", help=f"TinyStories text file (default: the data directory's {STORIES_FILE})")
    p.add_argument("--data-dir", help="benchmark data directory (default: $BYTELM_DATA_DIR or ../shared/data)")
    p.add_argument("--bpe-vocab", type=int, default=2048, help="BPE vocabulary size (default 2048: fits the 2 MiB sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=100, help="test stories (default 100, as the paper)")
    p.add_argument("--val-share", type=float, default=0.05, help="share of the other stories for validation")
    p.add_argument("--train-copies", type=int, default=0,
                   help="copies of the training stories, each with fresh random names (default 0: enough for about "
                        "240 MB of training text, one pass of a GPU sweep's run: 127 copies of the 2 MiB sample)")
    p.add_argument("--keep-train-names", action="store_true",
                   help="train on the stories' own names (the paper's set-up) instead of random ones; implies --train-copies 1")

    p = sub.add_parser("poly", help="polynomial arithmetic over F_7[X]/(X^5) (paper §4.2)")
    p.add_argument("--out", required=True, type=Path, help="output folder (a prepared-data folder)")
    p.add_argument("--n-train", type=int, default=1_000_000, help="training expressions (default 1,000,000)")
    p.add_argument("--n-val", type=int, default=2000, help="validation expressions")
    p.add_argument("--test-per-m", type=int, default=2000, help="test expressions per number of operations (default 2000)")
    p.add_argument("--m-train-max", type=int, default=5, help="training draws m in 1..this (default 5)")
    p.add_argument("--m-test-max", type=int, default=10, help="test sets for m in 1..this (default 10)")
    p.add_argument("--bpe-vocab", type=int, default=0, help="also train a BPE of this size (default 0: bytes only)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval", help="score a trained model on a synthetic test set; log to its run")
    p.add_argument("--task", required=True, choices=["induction", "poly"])
    p.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or a checkpoint folder")
    p.add_argument("--checkpoints", default="latest", choices=["latest", "all"],
                   help="all: every step checkpoint the run kept, and the best of them by the test metric "
                        "(the paper's epoch oracle, logged as oracle/<metric>); default latest")
    p.add_argument("--data", type=Path, help="the folder `bytelm synth induction|poly` wrote (default: the run's data.root)")
    p.add_argument("--json", type=Path, help="write the results here (default RUN_DIR/eval/synth_TASK.json)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=0, help="stories or prompts per forward (default 8 / 256)")
    p.add_argument("--max-per-m", type=int, default=0, help="poly: score only the first N expressions per m (0: all)")
    p.add_argument("--m-max", type=int, default=0, help="poly: score m in 1..this only (0: every test file)")


def main(args: argparse.Namespace) -> int:
    if args.synth_command == "induction":
        return make_induction(args)
    if args.synth_command == "poly":
        return make_poly(args)
    return evaluate(args)


def _check_out(out: Path, task: str) -> None:
    """Write only into a new or empty folder, or over an earlier data set of the same task."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("format") != "bytelm-synth/1" or manifest.get("task") != task:
        raise UserError(f"--out {out} exists and is not a `bytelm synth {task}` folder; choose a new or empty folder")


def make_induction(args) -> int:
    from bytelm.paths import data_file
    from data_prep.induction import InductionOptions, build_induction

    _check_out(args.out, "induction")
    stories = Path(args.stories) if args.stories else data_file(STORIES_FILE, args.data_dir)
    opts = InductionOptions(
        stories=str(stories), bpe_vocab=args.bpe_vocab, seed=args.seed, n_test=args.n_test, val_share=args.val_share,
        train_copies=args.train_copies, randomize_train=not args.keep_train_names,
    )
    t0 = time.time()
    m = build_induction(args.out, opts)
    c = m["counts"]
    print(f"induction: {c['distinct']} stories ({c['train']} train x {m['options']['train_copies']} copies, {c['val']} val, "
          f"{c['test']} test), {len(m['names']['detected'])} names found, BPE {m['bpe']['vocab_size']} tokens, "
          f"{time.time() - t0:.1f} s -> {args.out}")
    return 0


def make_poly(args) -> int:
    from data_prep.polynomials import PolyOptions, build_poly

    _check_out(args.out, "poly")
    opts = PolyOptions(n_train=args.n_train, n_val=args.n_val, test_per_m=args.test_per_m, m_train_max=args.m_train_max,
                       m_test_max=args.m_test_max, seed=args.seed, bpe_vocab=args.bpe_vocab)
    t0 = time.time()
    m = build_poly(args.out, opts)
    c = m["counts"]
    print(f"poly: {c['train']['docs']} train ({c['train']['bytes']} bytes), {c['val']['docs']} val, "
          f"{opts.test_per_m} test x m=1..{opts.m_test_max}, {time.time() - t0:.1f} s -> {args.out}")
    return 0


# ----------------------------------------------------------------------------- eval


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible here")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return name


def _check_tokenizer(tokenizer, data: Path) -> None:
    """A BPE model must use the data set's BPE: the test names are two tokens under it."""
    from bytelm.shards import sha256_file

    if tokenizer.kind != "bpe":
        return
    ours = data / "bpe" / "tokenizer.json"
    if not ours.is_file() or sha256_file(ours) != sha256_file(tokenizer.path):
        raise UserError(f"the model's BPE is not {ours}: train on this data set (data.root={data}) to evaluate on it")


def evaluate(args) -> int:
    """Scores the latest checkpoint, or with --checkpoints all every step checkpoint the run
    kept (each logged at its step), then picks the paper's "epoch oracle": the checkpoint
    with the best headline test metric (ORACLE_METRICS), logged as oracle/<metric>."""
    from bytelm.checkpoint import (list_checkpoints, load_config, load_model, load_tokenizer_of, read_state,
                                   resolve_checkpoint, run_dir_of)
    from bytelm.tracking import log_to_run

    latest = resolve_checkpoint(args.checkpoint)
    run_dir = run_dir_of(latest)
    ckpts = [latest]
    if args.checkpoints == "all":
        if Path(args.checkpoint).resolve() != run_dir.resolve() or not list_checkpoints(run_dir):
            raise UserError(f"--checkpoints all needs a run directory with step checkpoints, got {args.checkpoint}")
        ckpts = list_checkpoints(run_dir)
    out = args.json or run_dir / "eval" / f"synth_{args.task}.json"
    # one run's checkpoints share its data set and tokenizer: checked, and the tests read, once
    args.data = args.data or Path(load_config(latest).data.root)
    if not args.data.is_dir():
        raise UserError(f"--data {args.data} is not a folder (make it with `bytelm synth {args.task} --out DIR`)")
    _check_tokenizer(load_tokenizer_of(latest), args.data)
    tests = _read_tests(args)
    device = _device(args.device)
    t0 = time.time()
    by_step = []
    for i, ckpt in enumerate(ckpts):
        model, tokenizer, cfg = load_model(ckpt, device=device)
        step = read_state(ckpt).get("step")
        metrics, details, table = _score(args, tests, model, tokenizer, cfg)
        by_step.append({"step": step, "checkpoint": str(ckpt), "metrics": metrics, "details": details})
        print(f"step {step}:\n{table}")
        print("\n".join(f"{k} = {v:.4f}" for k, v in metrics.items()))
        if i < len(ckpts) - 1:  # the last is logged below, with the oracle and the JSON
            log_to_run(run_dir, metrics, step=step)
    last = by_step[-1]
    logged = last["metrics"]
    result = {"task": args.task, "checkpoint": last["checkpoint"], "step": last["step"], "data": str(args.data),
              "metrics": last["metrics"], "details": last["details"], "seconds": time.time() - t0}
    if args.checkpoints == "all":
        name = next(m for m in ORACLE_METRICS if m in last["metrics"])
        best = max(by_step, key=lambda r: r["metrics"][name])  # the earliest of equals
        result |= {"by_step": [{k: r[k] for k in ("step", "metrics")} for r in by_step],
                   "oracle": {"metric": name, "step": best["step"], "metrics": best["metrics"]}}
        logged = logged | {f"oracle/{k}": v for k, v in best["metrics"].items()} | {"oracle/step": best["step"]}
        print(f"oracle ({name}): step {best['step']}, {best['metrics'][name]:.4f}")
    write_json(out, result)
    log_to_run(run_dir, logged, artifacts=[out] if out.resolve().is_relative_to(run_dir.resolve()) else [], step=last["step"])
    print(f"synth eval: {args.task}, {len(by_step)} checkpoint(s) in {result['seconds']:.1f} s -> {out}")
    return 0


def _read_tests(args):
    """The task's test sets in args.data: induction's stories, or poly's problems by m."""
    from bytelm.synthetic_eval import read_jsonl

    if args.task == "induction":
        from data_prep.induction import TEST_FILE

        return read_jsonl(args.data / TEST_FILE)
    files = {int(p.stem[len("poly_m"):]): p for p in args.data.glob("tests/poly_m*.jsonl")}
    if not files:
        raise UserError(f"{args.data}/tests holds no poly_m*.jsonl (make it with `bytelm synth poly --out {args.data}`)")
    by_m = {}
    for m in sorted(m for m in files if not args.m_max or m <= args.m_max):
        recs = read_jsonl(files[m])
        by_m[m] = recs[: args.max_per_m] if args.max_per_m else recs
    return by_m


def _score(args, tests, model, tokenizer, cfg) -> tuple[dict, dict, str]:
    """(metrics, details, printed table) of one model on the task's test sets (`_read_tests`)."""
    if args.task == "induction":
        from bytelm.synthetic_eval import argmax_head1, induction_accuracy

        res = induction_accuracy(argmax_head1(model), tokenizer, tests, cfg.model.context, args.batch_size or 8)
        details = {"stories": res.stories, "occurrences_beyond_context": res.cut,
                   "repeated": vars(res.repeated), "first": vars(res.first)}
        rows = [["repeated (induction)", res.repeated.correct, res.repeated.total, f"{res.repeated.acc():.4f}",
                 f"{res.repeated.name_acc():.4f}"],
                ["first occurrence", res.first.correct, res.first.total, f"{res.first.acc():.4f}", f"{res.first.name_acc():.4f}"]]
        return res.metrics(), details, tabulate(rows, headers=["occurrences", "correct", "scored", "accuracy", "whole name"])

    from bytelm.generate import encode_prompt, generate
    from bytelm.synthetic_eval import poly_accuracy
    from data_prep.polynomials import END

    max_new = 16  # "c c c c c;" is 10 bytes, at most 10 tokens

    def complete(prompts: list[str]) -> list[str]:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new, temperature=0.0, stop=[END], heads=1,
                        batch_size=args.batch_size or 256)

    def fits(prompt: str) -> bool:
        return len(encode_prompt(tokenizer, prompt)) + max_new <= cfg.model.context

    res = poly_accuracy(complete, tests, fits)
    details = {"correct": res.correct, "total": res.total, "prompt_too_long": res.too_long}
    rows = [[m, res.correct[m], res.total[m], res.too_long[m], f"{res.correct[m] / res.total[m]:.4f}"] for m in sorted(res.total)]
    return res.metrics(), details, tabulate(rows, headers=["m", "correct", "total", "too long", "accuracy"])
