"""The benchmarks as `Problem`s: HumanEval, MBPP (test split) and APPS.

A problem knows its prompt, the benchmark's own solution (`reference`, a completion that
solves it), how a completion becomes a sandboxed program (`Problem.job`) and how the run is
judged (`Problem.judge`). Each task has its stop sequences and a generation budget
(`TASKS`). docs/evaluation.md shows the prompts and explains every choice.

- HumanEval (data dir `humaneval/HumanEval.jsonl.gz`): prompt = the problem's prompt;
  program = prompt + completion, then the test code and `check(entry_point)`.
- MBPP (data dir `mbpp/mbpp.jsonl`): the test split, task ids 11-510, in the three-shot
  format of the MBPP paper (tasks 2, 3, 4 as shots, the task's tests in the prompt, code
  between [BEGIN] and [DONE]); program = completion, then `test_setup_code`, then the
  asserts. Code fields are normalised (`normalise_code`).
- APPS (not in the data dir: `--apps PATH`): the official format, standard-input and
  call-based problems, filtered by difficulty; prompt format of the APPS repository.
"""

from __future__ import annotations

import ast
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from bytelm.errors import UserError
from bytelm.evaluation.sandbox import ExecResult, Job
from bytelm.fileio import iter_jsonl, read_jsonl
from bytelm.paths import data_file


@dataclass(frozen=True)
class TaskSpec:
    name: str
    stop: tuple[str, ...]  # a completion ends at the first of these (the generator cuts it)
    max_new_bytes: int  # generation budget; token models get half as many tokens (see max_new_tokens)


TASKS: dict[str, TaskSpec] = {
    # Codex's stop sequences (Chen et al. 2021): the end of the function's body.
    "humaneval": TaskSpec("humaneval", ("\nclass", "\ndef", "\n#", "\nif", "\nprint"), 1024),
    # The MBPP format's own delimiter, and the start of a next shot.
    "mbpp": TaskSpec("mbpp", ("[DONE]", "\nYou are an expert Python programmer"), 1024),
    # The start of a next problem in the APPS format.
    "apps": TaskSpec("apps", ("\nQUESTION:", "\nANSWER:"), 2048),
}

MBPP_TEST_IDS = range(11, 511)
MBPP_SHOT_IDS = (2, 3, 4)
APPS_DIFFICULTIES = ("introductory", "interview", "competition", "all")
APPS_HELP = (
    "APPS is not in the data directory (its test set is 1.3 GB). Get the official release "
    "(https://people.eecs.berkeley.edu/~hendrycks/APPS.tar.gz, unpacked: pass its APPS/ or APPS/test/ folder) "
    "or Hugging Face codeparrot/apps test.jsonl (pass the file), then give its path with --apps PATH "
    "or eval.apps_path"
)


def max_new_tokens(spec: TaskSpec, tokenizer_kind: str) -> int:
    """The budget in the model's tokens: bytes for a byte model; for a BPE model half as
    many tokens as bytes (our code BPE averages 2.6-3.0 bytes per token, so its budget in
    bytes is never smaller than the byte model's)."""
    return spec.max_new_bytes if tokenizer_kind == "bytes" else spec.max_new_bytes // 2


@dataclass(frozen=True)
class Problem:
    task: str
    task_id: str  # "HumanEval/0", "MBPP/11", "APPS/4000"
    prompt: str
    reference: str | None  # the benchmark's solution, as a completion of `prompt`
    solution_prefix: str = ""  # what precedes the completion in the program (HumanEval: the prompt)
    tests: str = ""  # assert mode: trusted test code run after the solution
    mode: str = "assert"  # assert | stdio | call (see sandbox.Job)
    inputs: tuple = ()  # stdio / call: one case each
    outputs: tuple = ()  # stdio / call: the expected results; they never enter the sandbox
    fn_name: str = ""
    class_method: bool = False

    def job(self, completion: str, timeout_s: float | None = None) -> Job:
        return Job(
            solution=self.solution_prefix + completion, tests=self.tests, mode=self.mode, inputs=self.inputs,
            fn_name=self.fn_name, class_method=self.class_method, timeout_s=timeout_s,
        )

    def judge(self, result: ExecResult) -> tuple[str, str]:
        """(status, reason) of a run: the sandbox's verdict, and for APPS the outputs
        compared with the expected ones (strict: every test must match)."""
        if self.mode == "assert" or result.status != "passed":
            return result.status, result.reason
        match = stdio_match if self.mode == "stdio" else call_match
        for i, ((got, _), want) in enumerate(zip(result.outputs, self.outputs)):
            if not match(got, want):
                return "failed", f"wrong output on test {i + 1} of {len(self.outputs)}"
        return "passed", ""


# ----------------------------------------------------------------------------- task ids and names


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = [t.strip().lower() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown task {', '.join(unknown) or repr(spec)}: choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


_ID_PREFIX = {"humaneval": "HumanEval", "mbpp": "MBPP", "apps": "APPS"}


def normalise_task_id(task: str, raw) -> str:
    """'HumanEval/3', 3 or '3' -> 'HumanEval/3'; 11 or 'Mbpp/11' -> 'MBPP/11'. An id of
    another benchmark ('MBPP/11' under humaneval) stays as it is: no problem of the task."""
    head, _, tail = str(raw).rpartition("/")
    if head and head.strip().lower() != _ID_PREFIX[task].lower():
        return str(raw)
    tail = tail.strip()
    return f"{_ID_PREFIX[task]}/{int(tail)}" if tail.isdigit() else str(raw)


# ----------------------------------------------------------------------------- loading


def load_problems(task: str, data_dir: str | os.PathLike | None = None, apps_path: str | os.PathLike | None = None,
                  apps_difficulty: str = "introductory") -> list[Problem]:
    """The problems of one task, in the benchmark's order."""
    if task == "humaneval":
        return load_humaneval(data_file("humaneval/HumanEval.jsonl.gz", data_dir))
    if task == "mbpp":
        return load_mbpp(data_file("mbpp/mbpp.jsonl", data_dir))
    if task == "apps":
        if not apps_path:
            raise UserError(APPS_HELP)
        return load_apps(apps_path, apps_difficulty)
    raise UserError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")


def load_humaneval(path: Path) -> list[Problem]:
    rows = read_jsonl(path)
    return [
        Problem(
            task="humaneval", task_id=r["task_id"], prompt=r["prompt"], reference=r["canonical_solution"],
            solution_prefix=r["prompt"], tests=f"{r['test']}\ncheck({r['entry_point']})\n",
        )
        for r in rows
    ]


def normalise_code(code: str) -> str:
    """MBPP's code fields use CRLF line endings and often tabs, and lines end in spaces.
    Returned: LF endings, indentation tabs as 4 spaces, no trailing whitespace — but only
    if that leaves the parsed program unchanged (same AST); otherwise (a tab inside a
    multi-line string, e.g. train task 669) only the line endings change. Python reads
    CRLF and LF alike, so the program's meaning never changes."""
    lf = code.replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in lf.split("\n"):
        body = line.lstrip(" \t")
        lines.append((line[: len(line) - len(body)].expandtabs(4) + body).rstrip())
    tidy = "\n".join(lines).strip("\n")
    with warnings.catch_warnings():  # the benchmark's own "\d"-style escapes
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        try:
            same = ast.dump(ast.parse(tidy)) == ast.dump(ast.parse(lf))
        except SyntaxError:
            same = False
    return tidy if same else lf


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """One MBPP prompt in the format of the MBPP paper (mbpp/README.md), up to [BEGIN]."""
    return (
        f"You are an expert Python programmer, and here is your task: {text.strip()} "
        "Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n"
    )


def load_mbpp(path: Path) -> list[Problem]:
    rows = {r["task_id"]: r for r in read_jsonl(path)}

    def tests_of(r: dict) -> list[str]:
        return [normalise_code(t) for t in r["test_list"]]

    shots = "".join(
        mbpp_prompt(rows[i]["text"], tests_of(rows[i])) + normalise_code(rows[i]["code"]) + "\n[DONE]\n"
        for i in MBPP_SHOT_IDS
    )
    problems = []
    for tid in MBPP_TEST_IDS:
        r = rows[tid]
        setup = normalise_code(r["test_setup_code"])
        problems.append(Problem(
            task="mbpp", task_id=f"MBPP/{tid}", prompt=shots + mbpp_prompt(r["text"], tests_of(r)),
            reference=normalise_code(r["code"]),
            tests="\n".join(([setup] if setup.strip() else []) + tests_of(r)) + "\n",
        ))
    return problems


def _apps_records(path: Path) -> list[dict]:
    """Raw APPS problems from a .jsonl (Hugging Face codeparrot/apps) or from the official
    folder layout (APPS/test/NNNN/{question.txt, input_output.json, metadata.json, ...})."""
    if path.is_file():
        records = []
        for n, r in iter_jsonl(path):
            if "question" not in r and {"description", "test_list"} <= set(r):
                raise UserError(
                    f"{path} is the MapCoder 150-problem subset of APPS (shared/data/apps), not APPS: it "
                    f"serves pipeline tests only and its numbers are not APPS pass@k. {APPS_HELP}"
                )
            missing = {"question", "input_output"} - set(r)
            if missing:
                raise UserError(f"{path} line {n} is not an APPS problem: it lacks {', '.join(sorted(missing))}")
            records.append(r)
        return records
    folder = path / "test" if (path / "test").is_dir() else path
    dirs = sorted((d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    if not dirs:
        raise UserError(f"{path} holds no APPS problem folders (NNNN/question.txt, ...). {APPS_HELP}")
    records = []
    for d in dirs:
        io_file, meta = d / "input_output.json", d / "metadata.json"
        if not (d / "question.txt").is_file() or not io_file.is_file():
            continue  # the official release has a few problems without tests
        records.append({
            "problem_id": int(d.name),
            "question": (d / "question.txt").read_text(encoding="utf-8"),
            "input_output": io_file.read_text(encoding="utf-8"),
            "difficulty": json.loads(meta.read_text())["difficulty"] if meta.is_file() else "",
            "starter_code": (d / "starter_code.py").read_text(encoding="utf-8") if (d / "starter_code.py").is_file() else "",
            "solutions": (d / "solutions.json").read_text(encoding="utf-8") if (d / "solutions.json").is_file() else "[]",
        })
    return records


def apps_prompt(question: str, starter_code: str, call_based: bool) -> str:
    """The prompt of the APPS repository's generate_gpt_codes.py."""
    return (
        "\nQUESTION:\n" + question + ("\n" + starter_code if starter_code else "")
        + ("\nUse Call-Based format" if call_based else "\nUse Standard Input format") + "\nANSWER:\n"
    )


def load_apps(path: str | os.PathLike, difficulty: str = "introductory") -> list[Problem]:
    path = Path(path)
    if difficulty not in APPS_DIFFICULTIES:
        raise UserError(f"unknown APPS difficulty {difficulty!r}: choose from {', '.join(APPS_DIFFICULTIES)}")
    if not path.exists():
        raise UserError(f"APPS path {path} does not exist. {APPS_HELP}")
    problems, seen = [], set()
    for i, r in enumerate(_apps_records(path)):
        if difficulty != "all" and r.get("difficulty") != difficulty:
            continue
        io = r["input_output"]
        try:
            io = json.loads(io) if isinstance(io, str) else io
        except json.JSONDecodeError:
            io = None
        if not io or not io.get("inputs"):
            continue  # no tests: nothing to judge
        fn_name = io.get("fn_name") or ""
        starter = r.get("starter_code") or ""
        solutions = r.get("solutions") or "[]"
        solutions = json.loads(solutions) if isinstance(solutions, str) else solutions
        # Standard input: a case given as a list of lines is those lines joined.
        inputs = tuple(x if fn_name else ("\n".join(x) if isinstance(x, list) else str(x)) for x in io["inputs"])
        task_id = f"APPS/{r.get('problem_id', i)}"
        if task_id in seen:
            raise UserError(f"{path}: problem {task_id} appears twice")
        seen.add(task_id)
        problems.append(Problem(
            task="apps", task_id=task_id,
            prompt=apps_prompt(r["question"], starter, bool(fn_name)),
            reference=solutions[0] if solutions else None,
            mode="call" if fn_name else "stdio", inputs=inputs, outputs=tuple(io["outputs"]),
            fn_name=fn_name, class_method="class Solution" in starter,
        ))
    return problems


# ----------------------------------------------------------------------------- judging APPS outputs


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def stdio_match(got: str, want) -> bool:
    """APPS standard-input output check, as lenient as the APPS harness: the same lines
    (trailing whitespace and blank lines at either end ignored), or the same
    whitespace-separated tokens, numbers equal within |a-b| <= 1e-8 + 1e-5·|b| (numpy's
    allclose, which the APPS harness uses)."""
    want = "\n".join(map(str, want)) if isinstance(want, list) else str(want)
    if _lines(got) == _lines(want):
        return True
    a, b = got.split(), want.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if not abs(fx - fy) <= 1e-8 + 1e-5 * abs(fy):
            return False
    return True


def _listify(x):
    if isinstance(x, (list, tuple)):
        return [_listify(v) for v in x]
    if isinstance(x, dict):
        return {k: _listify(v) for k, v in x.items()}
    return x


def call_match(got_repr: str | None, want) -> bool:
    """APPS call-based check: the returned value (tuples as lists, as JSON has them) equals
    the expected output, or its single element (APPS wraps most outputs in a list)."""
    if got_repr is None:
        return False
    try:
        got = _listify(ast.literal_eval(got_repr))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return got == want or (isinstance(want, list) and len(want) == 1 and got == want[0])
