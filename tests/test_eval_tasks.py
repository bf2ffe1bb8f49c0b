"""Benchmarks as problems: loading, prompt formats, normalisation, programs, APPS judging.

HumanEval and MBPP come from the real data in ../shared/data. The full APPS test set is not
on this machine: APPS tests use (a) problems of the MapCoder subset in shared/data/apps
converted to the official format in tmp_path (a pipeline check; those numbers are never
APPS results), and (b) small handmade problems in the official folder layout.
"""

import ast
import json
import re
import warnings
from pathlib import Path

import pytest

from bytelm.cli import main as bytelm
from bytelm.errors import UserError
from bytelm.evaluation.sandbox import Executor, Limits
from bytelm.evaluation.tasks import (
    TASKS, call_match, load_apps, load_problems, max_new_tokens, normalise_code, normalise_task_id, parse_tasks,
    stdio_match,
)
from bytelm.fileio import read_jsonl
from bytelm.paths import data_file

MAPCODER = data_file("apps/mapcoder_apps_selected150.jsonl")


@pytest.fixture(scope="module")
def ex():
    # a wall clock no reference solution nears even on a saturated machine: no outcome
    # here may depend on the machine's load
    with Executor(workers=2, limits=Limits(timeout_s=120)) as e:
        yield e


def judge_all(ex, problems, completions):
    return [p.judge(r) for p, r in zip(problems, ex.map([p.job(c) for p, c in zip(problems, completions)]))]


def test_humaneval_problems():
    ps = load_problems("humaneval")
    assert len(ps) == 164 and ps[0].task_id == "HumanEval/0" and ps[-1].task_id == "HumanEval/163"
    p = ps[0]
    assert p.solution_prefix == p.prompt and p.prompt.rstrip().endswith('"""')
    assert p.tests.rstrip().endswith("check(has_close_elements)")
    assert p.job("    return True\n").solution == p.prompt + "    return True\n"


def test_mbpp_prompt_is_the_papers_three_shot_format():
    ps = load_problems("mbpp")
    assert [p.task_id for p in ps] == [f"MBPP/{i}" for i in range(11, 511)]
    prompt = ps[0].prompt
    blocks = prompt.split("You are an expert Python programmer, and here is your task: ")
    assert blocks[0] == "" and len(blocks) == 5  # three shots and the task
    assert blocks[1].startswith("Write a function to find the similar elements from the given two tuple lists. "
                                "Your code should pass these tests:\n\nassert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n")
    assert blocks[1].endswith("[BEGIN]\ndef similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & set(test_tup2))\n"
                              "  return (res)\n[DONE]\n")
    assert blocks[2].startswith("Write a python function to identify non-prime numbers.")
    assert blocks[3].startswith("Write a function to find the largest integers")
    assert blocks[4] == ('Write a python function to remove first and last occurrence of a given character from the string. '
                         'Your code should pass these tests:\n\nassert remove_Occ("hello","l") == "heo"\n'
                         'assert remove_Occ("abcda","a") == "bcd"\nassert remove_Occ("PHP","P") == "H"\n[BEGIN]\n')
    assert "\r" not in prompt and "\t" not in prompt
    assert all(p.prompt.startswith(blocks[0] + "You are") and p.prompt.endswith("[BEGIN]\n") for p in ps)


def test_normalising_mbpp_code_never_changes_a_program():
    rows = read_jsonl(data_file("mbpp/mbpp.jsonl"))
    fell_back = []
    warnings.simplefilter("ignore", DeprecationWarning)  # the benchmark's own "\d"-style escapes
    for r in rows:
        for code in [r["code"], r["test_setup_code"], *r["test_list"]]:
            out = normalise_code(code)
            assert ast.dump(ast.parse(out)) == ast.dump(ast.parse(code.replace("\r\n", "\n")))
            assert "\r" not in out
            if re.search(r"^ *\t", out, re.M):
                fell_back.append(r["task_id"])
    assert fell_back == [669]  # a tab inside a multi-line string: only line endings change


def test_mbpp_setup_code_is_run_before_the_asserts(ex):
    p = next(p for p in load_problems("mbpp") if p.task_id == "MBPP/367")
    assert p.tests.startswith("root = Node(1)")
    always_true = p.reference.replace("def is_tree_balanced(root):", "def is_tree_balanced(root):\n    return True")
    (ok, _), (bad, _) = judge_all(ex, [p, p], [p.reference, always_true])
    assert (ok, bad) == ("passed", "failed")


def test_references_pass_and_empty_or_wrong_completions_fail(ex):
    ps = load_problems("humaneval")[:15] + load_problems("mbpp")[:15]
    assert all(s == "passed" for s, _ in judge_all(ex, ps, [p.reference for p in ps]))
    assert all(s != "passed" for s, _ in judge_all(ex, ps, [""] * len(ps)))
    wrong = ["    return None\n" if p.task == "humaneval" else "def f():\n    pass\n" for p in ps]
    assert all(s != "passed" for s, _ in judge_all(ex, ps, wrong))


def test_task_names_ids_and_budgets():
    assert parse_tasks("HumanEval, mbpp,humaneval") == ["humaneval", "mbpp"]
    with pytest.raises(UserError, match="unknown task gsm8k"):
        parse_tasks("humaneval,gsm8k")
    assert normalise_task_id("humaneval", "HumanEval/3") == "HumanEval/3"
    assert normalise_task_id("mbpp", 11) == normalise_task_id("mbpp", "Mbpp/11") == "MBPP/11"
    assert normalise_task_id("apps", "4000") == "APPS/4000"
    assert max_new_tokens(TASKS["humaneval"], "bytes") == 1024 and max_new_tokens(TASKS["humaneval"], "bpe") == 512


# ----------------------------------------------------------------------------- APPS


def mapcoder_as_apps(row: dict) -> dict:
    """A MapCoder record in the official APPS (Hugging Face) format. MapCoder keeps each
    call's arguments as lines of text; JSON where a line parses, else the raw string."""
    def arg(text):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    fn_name = re.search(r"def (\w+)\(", row["starter_code"]).group(1)
    io = {"inputs": [[arg(x) for x in t["input"].split("\n")] for t in row["test_list"]],
          "outputs": [t["output"] for t in row["test_list"]], "fn_name": fn_name}
    return {"problem_id": row["id"], "question": row["description"], "starter_code": row["starter_code"],
            "difficulty": row["difficulty"], "input_output": json.dumps(io), "solutions": "[]"}


def write_apps_jsonl(path: Path) -> Path:
    """The subset's problems with starter code (call-based), each id once (the subset
    repeats some), as an official-format jsonl: a pipeline check, never APPS results."""
    rows = {}
    for r in read_jsonl(MAPCODER):
        if r["starter_code"].strip():
            rows.setdefault(r["id"], r)
    path.write_text("".join(json.dumps(mapcoder_as_apps(r)) + "\n" for r in rows.values()))
    return path


@pytest.fixture
def apps_jsonl(tmp_path) -> Path:
    return write_apps_jsonl(tmp_path / "apps_pipeline.jsonl")


def write_apps_folder(root: Path) -> Path:
    problems = {
        "0001": ("introductory", "Read two integers and print their sum.", ["1 2\n", "5 7\n"], ["3\n", "12\n"],
                 ["a, b = map(int, input().split())\nprint(a + b)\n"]),
        "0002": ("interview", "Print the input reversed.", ["abc\n"], ["cba\n"], ["print(input()[::-1])\n"]),
        "0003": ("introductory", "Print 1/n.", [["3"], ["8"]], ["0.333333333\n", "0.125"], ["print(1 / int(input()))\n"]),
    }
    for pid, (difficulty, question, inputs, outputs, solutions) in problems.items():
        d = root / "APPS" / "test" / pid
        d.mkdir(parents=True)
        (d / "question.txt").write_text(question)
        (d / "input_output.json").write_text(json.dumps({"inputs": inputs, "outputs": outputs}))
        (d / "metadata.json").write_text(json.dumps({"difficulty": difficulty, "url": "handmade"}))
        (d / "solutions.json").write_text(json.dumps(solutions))
    return root / "APPS"


def test_apps_call_based_problems_from_the_official_jsonl(ex, apps_jsonl):
    ps = {p.task_id: p for p in load_apps(apps_jsonl)}
    assert len(ps) == 49  # the subset's introductory problems (all call-based)
    p = ps["APPS/4465"]
    assert (p.mode, p.fn_name, p.class_method, len(p.inputs)) == ("call", "super_size", False, 10)
    assert p.prompt.startswith("\nQUESTION:\n") and p.prompt.endswith("\ndef super_size(n):\n\t\nUse Call-Based format\nANSWER:\n")
    right = "def super_size(n):\n    return int(''.join(sorted(str(n), reverse=True)))\n"
    wrong = "def super_size(n):\n    return n\n"
    (a, _), (b, why) = judge_all(ex, [p, p], [right, wrong])
    assert a == "passed" and (b, why) == ("failed", "wrong output on test 1 of 10")
    e = ps["APPS/3045"]
    right = "def elevator(left, right, call):\n    return 'left' if abs(call - left) < abs(call - right) else 'right'\n"
    assert judge_all(ex, [e], [right])[0][0] == "passed"
    counts = {d: len(load_apps(apps_jsonl, d)) for d in ("introductory", "interview", "competition")}
    n_lines = len(apps_jsonl.read_text().splitlines())
    assert sum(counts.values()) == len(load_apps(apps_jsonl, "all")) == n_lines and counts["introductory"] == 49
    duplicated = apps_jsonl.parent / "twice.jsonl"
    duplicated.write_text(apps_jsonl.read_text().splitlines()[0] + "\n" + apps_jsonl.read_text())
    with pytest.raises(UserError, match="appears twice"):
        load_apps(duplicated)


def test_apps_standard_input_problems_from_the_official_folder(ex, tmp_path):
    root = write_apps_folder(tmp_path)
    for path in (root, root / "test"):
        ps = load_apps(path)
        assert [p.task_id for p in ps] == ["APPS/1", "APPS/3"]  # introductory only
    p1, p3 = ps
    assert p1.mode == "stdio" and p1.prompt == "\nQUESTION:\nRead two integers and print their sum.\nUse Standard Input format\nANSWER:\n"
    assert p3.inputs == ("3", "8")  # a case given as a list of lines is those lines joined
    results = judge_all(ex, [p1, p3, p1], [p1.reference, p3.reference, "print(3)\n"])
    assert [s for s, _ in results] == ["passed", "passed", "failed"]


def test_apps_inputs_that_are_not_apps_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="MapCoder 150-problem subset"):
        load_apps(MAPCODER)
    with pytest.raises(UserError, match="APPS path .* does not exist.*APPS.tar.gz"):
        load_apps(tmp_path / "nowhere")
    with pytest.raises(UserError, match="APPS is not in the data directory"):
        load_problems("apps")
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "input_output": "{}"}\n{oops\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_apps(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="unknown APPS difficulty"):
        load_apps(tmp_path / "bad.jsonl", "easy")


def test_apps_output_comparison():
    assert stdio_match("3\n", "3") and stdio_match("1 2 \n3\n\n", "1 2\n3")
    assert stdio_match("1 2\n3\n", "1\n2 3")  # same tokens
    assert stdio_match("0.3333333333333333\n", "0.333333333") and stdio_match("1e9", "1000000000.0")
    assert not stdio_match("0.3334\n", "0.3333") and not stdio_match("3\n", "4") and not stdio_match("", "0")
    assert stdio_match("YES\nNO\n", ["YES", "NO"])
    assert call_match("96", [96]) and call_match("(1, [2, 3])", [1, [2, 3]]) and call_match("[[1, 2]]", [[1, 2]])
    assert not call_match("95", [96]) and not call_match(None, [96]) and not call_match("<object at 0x1>", [1])


def test_bytelm_eval_runs_apps_samples(apps_jsonl, tmp_path):
    right = "def super_size(n):\n    return int(''.join(sorted(str(n), reverse=True)))\n"
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": 4465, "completion": right}) + "\n"
                       + json.dumps({"task_id": "APPS/4465", "completion": "def super_size(n):\n    return n\n"}) + "\n")
    out = tmp_path / "apps.json"
    with pytest.raises(SystemExit) as e:
        bytelm(["eval", "--samples", str(samples), "--task", "apps", "--apps", str(apps_jsonl), "--json", str(out)])
    assert e.value.code == 0
    summary = json.loads(out.read_text())
    assert summary["pass_at_k"] == {"1": 0.5} and summary["n_problems_in_task"] == 49
