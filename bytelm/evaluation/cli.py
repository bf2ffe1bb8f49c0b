"""`bytelm eval`: pass@k on HumanEval / MBPP / APPS, in one of three modes.

    bytelm eval --checkpoint RUN_OR_CKPT --task humaneval,mbpp [--n-samples 200]
                [--temperatures 0.1,0.2,0.4,0.8] [--max-problems M] [--json OUT]
    bytelm eval --samples FILE.jsonl --task humaneval --json OUT
    bytelm eval --reference --task humaneval,mbpp --json OUT

Settings default to eval.* of the checkpoint's config (checkpoint mode) or of the default
config (the other modes); flags override them. docs/evaluation.md describes the outputs.
"""

from __future__ import annotations

import argparse
import sys

from bytelm.errors import UserError
from bytelm.evaluation.runner import EvalSettings, check_outputs, run_checkpoint, run_reference, run_samples
from bytelm.evaluation.tasks import APPS_DIFFICULTIES, parse_tasks


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_argument_group("mode (exactly one)")
    mode.add_argument("--checkpoint", metavar="PATH", help="a run directory (its latest checkpoint) or a checkpoint folder")
    mode.add_argument("--samples", metavar="FILE", help='a JSONL of {"task_id", "completion"} to evaluate')
    mode.add_argument("--reference", action="store_true", help="the benchmarks' own solutions (each must pass)")
    p.add_argument("--task", help="humaneval, mbpp, apps, comma-separated (samples mode: one); default eval.tasks")
    p.add_argument("--json", metavar="OUT", help="summary JSON; beside it (out.json -> out.results.jsonl) each sample's "
                   "result (checkpoint mode default: RUN_DIR/eval/pass_at_k.json)")
    p.add_argument("--n-samples", type=int, help="samples per problem and temperature (eval.n_samples; the paper: 200)")
    p.add_argument("--temperatures", help="comma-separated temperature grid (eval.temperatures)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (eval.top_p)")
    p.add_argument("--batch-size", type=int, help="generation batch (eval.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget in the model's tokens for every task (0 = each task's own, docs/evaluation.md)")
    p.add_argument("--heads", type=int, help="sample with k heads: self-speculative sampling, the same distribution "
                                             "(eval.heads; default 0 = min(the model's heads, 8); 1 = plain sampling)")
    p.add_argument("--tree", default="",
                   help="verify a tree of draft candidates per step instead of a chain: a node count (the tree of "
                        "that size in the checkpoint's trees.json, from `bytelm tree-fit`) or a tree file; exact "
                        "sampling (recursive rejection over the tree)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--attention", default="auto",
                   help="the decoding step's attention: auto (PyTorch's choice for the step's boolean mask), "
                        "efficient, math, cudnn or flex (docs/decoding.md)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights while sampling (auto: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--max-problems", type=int, default=0, help="only the first M problems of each task (0 = all)")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="a prompt longer than the model's context keeps its last tokens (room is left for half the "
                        "context of new tokens) instead of scoring 0 ungenerated; recorded per sample and in the summary")
    p.add_argument("--allow-no-samples", action="store_true",
                   help="exit 0 even when no sample could be generated (every prompt longer than the context)")
    p.add_argument("--timeout", type=float, help="wall-clock seconds per program (eval.timeout_s)")
    p.add_argument("--workers", type=int, help="programs run at once (eval.workers; 0 = every core)")
    p.add_argument("--data-dir", help="the benchmark data folder (eval.data_dir; default $BYTELM_DATA_DIR or ../shared/data)")
    p.add_argument("--apps", metavar="PATH", help="the APPS test set: a .jsonl or the official folder (eval.apps_path)")
    p.add_argument("--apps-difficulty", choices=APPS_DIFFICULTIES, help="(eval.apps_difficulty; the paper: introductory)")


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def settings_from(args: argparse.Namespace, eval_cfg) -> EvalSettings:
    """eval.* of a config, overridden by the flags that were given."""
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    s = EvalSettings(
        data_dir=pick(args.data_dir, eval_cfg.data_dir) or None,
        apps_path=pick(args.apps, eval_cfg.apps_path) or None,
        apps_difficulty=pick(args.apps_difficulty, eval_cfg.apps_difficulty),
        max_problems=args.max_problems,
        timeout_s=pick(args.timeout, eval_cfg.timeout_s),
        workers=pick(args.workers, eval_cfg.workers),
        n_samples=pick(args.n_samples, eval_cfg.n_samples),
        temperatures=_floats(args.temperatures, "--temperatures") if args.temperatures else list(eval_cfg.temperatures),
        top_p=pick(args.top_p, eval_cfg.top_p),
        batch_size=pick(args.batch_size, eval_cfg.batch_size),
        max_new_tokens=pick(args.max_new_tokens, eval_cfg.max_new_tokens),
        heads=pick(args.heads, eval_cfg.heads), seed=args.seed, device=args.device, dtype=args.dtype,
        attention=args.attention, truncate_prompts=args.truncate_prompts, tree=args.tree,
    )
    checks = [
        (s.n_samples >= 1, "--n-samples must be >= 1"),
        (all(t >= 0 for t in s.temperatures), "--temperatures must be >= 0"),
        (0 < s.top_p <= 1, "--top-p must be in (0, 1]"),
        (s.batch_size >= 1, "--batch-size must be >= 1"),
        (s.max_new_tokens >= 0, "--max-new-tokens must be >= 0"),
        (s.heads >= 0, "--heads must be >= 0 (0: the model's heads, at most 8)"),
        (s.max_problems >= 0, "--max-problems must be >= 0"),
        (s.timeout_s > 0, "--timeout must be > 0"),
        (s.workers >= 0, "--workers must be >= 0"),
        (s.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    return s


def main(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.checkpoint, args.samples, args.reference))) != 1:
        raise UserError("give exactly one of --checkpoint PATH, --samples FILE, --reference")
    from bytelm.config import EvalConfig

    if args.checkpoint:
        from bytelm.checkpoint import load_config, resolve_checkpoint

        eval_cfg = load_config(resolve_checkpoint(args.checkpoint)).eval
    else:
        eval_cfg = EvalConfig()
    settings = settings_from(args, eval_cfg)
    if args.attention != "auto":
        from bytelm.generate import ATTENTION_BACKENDS

        if args.attention not in ATTENTION_BACKENDS:
            raise UserError(f"--attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {args.attention!r}")
    if args.samples and not args.task:
        raise UserError("--samples needs --task (humaneval, mbpp or apps)")
    tasks = parse_tasks(args.task or eval_cfg.tasks)
    if args.json:  # refused before any program runs
        check_outputs(args.json, inputs=[p for p in (args.samples, args.checkpoint) if p])
    if args.checkpoint:
        summary = run_checkpoint(args.checkpoint, tasks, settings, args.json)
        if not args.allow_no_samples and not any(v["samples_generated"] for v in summary["tasks"].values()):
            print(f"bytelm eval: error: no sample could be generated: every prompt is longer than the model's context "
                  f"({summary['context']} tokens); the zeros above are not a measurement (--truncate-prompts cuts "
                  "prompts to fit, --allow-no-samples accepts this)", file=sys.stderr)
            return 1
        return 0
    if not args.json:
        raise UserError("--json OUT is needed with --samples and --reference")
    if args.samples:
        if len(tasks) != 1:
            raise UserError(f"--samples evaluates one task, got {', '.join(tasks)}")
        run_samples(args.samples, tasks[0], args.json, settings)
        return 0
    summary = run_reference(tasks, args.json, settings)
    return 1 if any(v["failures"] for v in summary["tasks"].values()) else 0
