"""`bytelm synth eval`: the metrics of the synthetic tasks, computed from a trained model
(docs/synthetic.md).

    bytelm synth eval --task induction|poly --checkpoint RUN_DIR [--checkpoints latest|all] [--data DIR] [--json OUT]

scores a trained model on the test sets that `bytelm synth induction|poly` wrote, prints
the numbers, writes them as JSON and logs them into the run's MLflow run. What the data
set decides (its test files, the answer's end marker, the training range of m) is read
from its manifest.json.

Induction (teacher-forced, head 1): a name of a test story is scored at each occurrence
on the tokens of the name after its first token, each predicted from the position
before it. Under the data set's BPE every name is exactly two tokens, so this is the
paper's "second token of the name"; under bytes it is bytes 2..len of the name. The
headline counts only repeated occurrences (the name has appeared before: pure
induction); first occurrences are reported as a control (no copying is possible there).

Polynomials: greedy decoding of the answer after '=' and exact match of all 5
coefficients, per number of operations m.

Metric names: `induction/acc` (BPE) or `induction/acc_bytes` (bytes), with `_name` (all
scored tokens of an occurrence right) and `_first` (first occurrences);
`poly/acc/m{m}`, `poly/acc_in_domain` (m in the training range, 1..m_train_max),
`poly/acc_ood` (larger m), and `poly/m_train_max` itself, so that a report can say where
the domain ends.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tabulate import tabulate

from bytelm.errors import UserError
from bytelm.fileio import read_jsonl, write_json
from bytelm.shards import SYNTH_FORMAT, sha256_file
from bytelm.tokenizers import Tokenizer

# the test metric that picks the oracle checkpoint (--checkpoints all), the first a task logs
ORACLE_METRICS = ("induction/acc", "induction/acc_bytes", "poly/acc_in_domain")


# ----------------------------------------------------------------------------- induction


@dataclass
class Target:
    """One occurrence of a name: the positions whose head-1 prediction is scored."""

    repeated: bool  # the name occurred earlier in the story
    positions: list[int]  # input positions t; the prediction at t is compared with ids[t + 1]


@dataclass
class StoryTargets:
    ids: list[int]
    targets: list[Target]
    cut: int = 0  # occurrences dropped because they end beyond the model's context


def story_targets(tokenizer: Tokenizer, record: dict, context: int) -> StoryTargets:
    """Token ids of a test story and the scored positions of each name occurrence.

    The story starts after an EOS, as every document does in the shards. An occurrence
    with byte span [s, e) covers the tokens from the one holding byte s to the one
    holding byte e - 1; all of them but the first are scored.
    """
    ids = [tokenizer.eos_id] + list(tokenizer.encode(record["text"]))  # EOS stands for 0 bytes
    ends = np.cumsum(tokenizer.token_byte_lengths[np.asarray(ids, dtype=np.int64)])
    out = StoryTargets(ids[:context], [])
    for name in record["names"]:
        for k, (s, e) in enumerate(name["spans"]):
            first = int(np.searchsorted(ends, s, side="right"))
            last = int(np.searchsorted(ends, e - 1, side="right"))
            if last >= context:
                out.cut += 1
                continue
            out.targets.append(Target(k > 0, list(range(first, last))))
    return out


@dataclass
class Tally:
    correct: int = 0
    total: int = 0
    names_correct: int = 0  # occurrences with every scored token right
    names_total: int = 0

    def add(self, hits: list[bool]) -> None:
        if not hits:
            return
        self.correct += sum(hits)
        self.total += len(hits)
        self.names_correct += all(hits)
        self.names_total += 1

    def acc(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def name_acc(self) -> float:
        return self.names_correct / self.names_total if self.names_total else float("nan")


@dataclass
class InductionResult:
    tokenizer: str  # bytes | bpe
    repeated: Tally = field(default_factory=Tally)
    first: Tally = field(default_factory=Tally)
    stories: int = 0
    cut: int = 0

    def metrics(self) -> dict[str, float]:
        p = "induction/acc" if self.tokenizer == "bpe" else "induction/acc_bytes"
        return {
            p: self.repeated.acc(),
            f"{p}_name": self.repeated.name_acc(),
            f"{p}_first": self.first.acc(),
            f"{p}_n": float(self.repeated.total),
        }


# The predictor: token ids (B, T) -> head-1 argmax (B, T). A model is wrapped by
# `argmax_head1`; tests pass a fixed function.
Predictor = Callable[[torch.Tensor], torch.Tensor]


def argmax_head1(model: torch.nn.Module) -> Predictor:
    device = next(model.parameters()).device

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device), n_heads=1)[:, :, 0].argmax(-1).cpu()

    return predict


def induction_accuracy(
    predict: Predictor, tokenizer: Tokenizer, records: Iterable[dict], context: int, batch_size: int = 8
) -> InductionResult:
    """Teacher-forced head-1 accuracy on name tokens after the first (see module doc)."""
    result = InductionResult(tokenizer.kind)
    stories = [story_targets(tokenizer, r, context) for r in records]
    for i in range(0, len(stories), batch_size):
        batch = stories[i : i + batch_size]
        T = max(len(s.ids) for s in batch)
        # Right padding: a causal model's predictions at real positions ignore it.
        x = torch.full((len(batch), T), tokenizer.pad_id, dtype=torch.long)
        for b, s in enumerate(batch):
            x[b, : len(s.ids)] = torch.tensor(s.ids)
        pred = predict(x)
        for b, s in enumerate(batch):
            result.stories += 1
            result.cut += s.cut
            for t in s.targets:
                hits = [int(pred[b, p]) == s.ids[p + 1] for p in t.positions]
                (result.repeated if t.repeated else result.first).add(hits)
    return result


# ----------------------------------------------------------------------------- polynomials


@dataclass
class PolyResult:
    m_train_max: int  # training drew m in 1..m_train_max: larger m is out of domain
    correct: dict[int, int] = field(default_factory=dict)  # m -> exact matches
    total: dict[int, int] = field(default_factory=dict)
    too_long: dict[int, int] = field(default_factory=dict)  # prompts that did not fit (counted wrong)

    def metrics(self) -> dict[str, float]:
        out = {f"poly/acc/m{m}": self.correct[m] / self.total[m] for m in sorted(self.total)}
        for name, keep in (("in_domain", lambda m: m <= self.m_train_max), ("ood", lambda m: m > self.m_train_max)):
            ms = [m for m in self.total if keep(m)]
            if ms:
                out[f"poly/acc_{name}"] = sum(self.correct[m] for m in ms) / sum(self.total[m] for m in ms)
        out["poly/m_train_max"] = float(self.m_train_max)
        return out


def is_correct(completion: str, answer: str, end: str) -> bool:
    """Exact match: the completion up to the end marker `end` is the answer."""
    return completion.split(end, 1)[0] == answer


def poly_accuracy(
    complete: Callable[[list[str]], list[str]], records_by_m: dict[int, list[dict]], fits: Callable[[str], bool],
    end: str, m_train_max: int,
) -> PolyResult:
    """`complete` maps prompts to greedy completions; `fits` says whether a prompt leaves
    room in the model's context for the answer; `end` ends an answer, and m up to
    `m_train_max` is in domain (both from the data set's manifest)."""
    res = PolyResult(m_train_max)
    for m, records in sorted(records_by_m.items()):
        ok = [r for r in records if fits(r["prompt"])]
        outs = complete([r["prompt"] for r in ok]) if ok else []
        res.correct[m] = sum(is_correct(o, r["answer"], end) for o, r in zip(outs, ok))
        res.total[m] = len(records)
        res.too_long[m] = len(records) - len(ok)
    return res


# ----------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    return evaluate(args)


def read_manifest(data: Path, task: str) -> dict:
    """The manifest of a `bytelm synth TASK` data set, with the keys the evaluation reads."""
    path = data / "manifest.json"
    make = f"make it with `bytelm synth {task} --out DIR`"
    try:
        manifest = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{data} holds no manifest.json: it is not a `bytelm synth {task}` data set ({make})") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); {make}") from None
    if manifest.get("format") != SYNTH_FORMAT or manifest.get("task") != task:
        raise UserError(f"{data} is not a `bytelm synth {task}` data set (its manifest says format "
                        f"{manifest.get('format')!r}, task {manifest.get('task')!r}); {make}")
    needs = ["test_file"] if task == "induction" else ["test_files", "answer_end", "options"]
    missing = [k for k in needs if k not in manifest]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: the data set was made by an older `bytelm synth "
                        f"{task}`; make it again with `bytelm synth {task} --out DIR` (same options, same data)")
    return manifest


def _check_tokenizer(tokenizer: Tokenizer, data: Path) -> None:
    """A BPE model must use the data set's BPE: the test names are two tokens under it."""
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
    from bytelm.generate import inference_device
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
    manifest = read_manifest(args.data, args.task)
    _check_tokenizer(load_tokenizer_of(latest), args.data)
    tests = _read_tests(args, manifest)
    device = inference_device(args.device)
    t0 = time.time()
    by_step = []
    for i, ckpt in enumerate(ckpts):
        model, tokenizer, cfg = load_model(ckpt, device=device)
        step = read_state(ckpt).get("step")
        metrics, details, table = _score(args, manifest, tests, model, tokenizer, cfg)
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


def _read_tests(args: argparse.Namespace, manifest: dict):
    """The task's test sets in args.data, as its manifest lists them: induction's stories,
    or poly's problems by m."""
    if args.task == "induction":
        return read_jsonl(args.data / manifest["test_file"])
    files = {int(m): args.data / f for m, f in manifest["test_files"].items()}
    by_m = {}
    for m in sorted(m for m in files if not args.m_max or m <= args.m_max):
        recs = read_jsonl(files[m])
        by_m[m] = recs[: args.max_per_m] if args.max_per_m else recs
    return by_m


def _score(args: argparse.Namespace, manifest: dict, tests, model, tokenizer: Tokenizer, cfg) -> tuple[dict, dict, str]:
    """(metrics, details, printed table) of one model on the task's test sets (`_read_tests`)."""
    if args.task == "induction":
        res = induction_accuracy(argmax_head1(model), tokenizer, tests, cfg.model.context, args.batch_size or 8)
        details = {"stories": res.stories, "occurrences_beyond_context": res.cut,
                   "repeated": vars(res.repeated), "first": vars(res.first)}
        rows = [["repeated (induction)", res.repeated.correct, res.repeated.total, f"{res.repeated.acc():.4f}",
                 f"{res.repeated.name_acc():.4f}"],
                ["first occurrence", res.first.correct, res.first.total, f"{res.first.acc():.4f}", f"{res.first.name_acc():.4f}"]]
        return res.metrics(), details, tabulate(rows, headers=["occurrences", "correct", "scored", "accuracy", "whole name"])

    from bytelm.generate import encode_prompt, generate

    end = manifest["answer_end"]
    max_new = 16  # "c c c c c;" is 10 bytes, at most 10 tokens

    def complete(prompts: list[str]) -> list[str]:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new, temperature=0.0, stop=[end], heads=1,
                        batch_size=args.batch_size or 256)

    def fits(prompt: str) -> bool:
        return len(encode_prompt(tokenizer, prompt)) + max_new <= cfg.model.context

    res = poly_accuracy(complete, tests, fits, end, manifest["options"]["m_train_max"])
    details = {"correct": res.correct, "total": res.total, "prompt_too_long": res.too_long}
    rows = [[m, res.correct[m], res.total[m], res.too_long[m], f"{res.correct[m] / res.total[m]:.4f}"] for m in sorted(res.total)]
    return res.metrics(), details, tabulate(rows, headers=["m", "correct", "total", "too long", "accuracy"])
