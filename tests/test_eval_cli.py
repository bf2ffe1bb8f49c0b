"""`bytelm eval` end to end: samples mode, reference mode over every HumanEval and MBPP
test problem, and one clear message (exit 2) for each kind of bad input."""

import gzip
import json

import pytest

from bytelm.cli import main as bytelm
from bytelm.evaluation.passk import pass_at_k
from bytelm.fileio import read_jsonl
from bytelm.paths import data_file


def run_cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        bytelm(["eval", *argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def humaneval_rows(n):
    with gzip.open(data_file("humaneval/HumanEval.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def test_samples_mode_end_to_end(tmp_path, capsys):
    rows = humaneval_rows(3)
    passing = {0: 10, 1: 3, 2: 0}  # of 10 samples per problem
    lines = []
    for i, r in enumerate(rows):
        for j in range(10):
            good = j < passing[i]
            lines.append({"task_id": r["task_id"], "completion": r["canonical_solution"] if good else "    return None\n",
                          "model": "handmade"})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out" / "he.json"
    # --timeout far beyond what the programs need: the counts below must not depend on load
    code, stdout, _ = run_cli(["--samples", str(samples), "--task", "humaneval", "--json", str(out), "--timeout", "120"],
                              capsys)
    assert code == 0 and "pass@10" in stdout
    summary = json.loads(out.read_text())
    assert summary["n_problems"] == 3 and summary["n_samples"] == 30 and summary["n_problems_in_task"] == 164
    assert summary["pass_at_k"]["1"] == pytest.approx((1 + 0.3 + 0) / 3)
    assert summary["pass_at_k"]["10"] == pytest.approx((1 + pass_at_k(10, 3, 10) + 0) / 3)
    assert "100" not in summary["pass_at_k"]  # 10 samples per problem
    assert summary["status_counts"] == {"passed": 13, "failed": 17, "timeout": 0, "error": 0}
    assert summary["sandbox"]["mode"] == "namespaces"
    results = read_jsonl(tmp_path / "out" / "he.results.jsonl")
    assert len(results) == 30 and all(r["model"] == "handmade" and r["network_isolated"] for r in results)
    assert [r["passed"] for r in results[10:20]] == [True] * 3 + [False] * 7
    assert results[29]["status"] == "failed" and results[29]["reason"].startswith("AssertionError")


@pytest.mark.slow
def test_reference_solutions_all_pass(tmp_path, capsys):
    """Every HumanEval problem and every MBPP test problem (664 programs, all cores)."""
    out = tmp_path / "ref.json"
    # The programs need well under a second of CPU each; a wall clock far beyond that keeps
    # the verdict about the solutions, not about how busy the machine is.
    code, _, err = run_cli(["--reference", "--task", "humaneval,mbpp", "--json", str(out), "--timeout", "120"],
                           capsys)
    summary = json.loads(out.read_text())
    failures = {t: v["failures"] for t, v in summary["tasks"].items()}
    assert code == 0, (failures, err)
    for task, n in (("humaneval", 164), ("mbpp", 500)):
        s = summary["tasks"][task]
        assert s["pass_at_k"] == {"1": 1.0} and s["n_problems"] == n and s["failures"] == []


def test_bad_input_is_one_clear_message(tmp_path, capsys):
    good = json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"})
    files = {
        "badjson": f"{good}\n{{'task_id': oops\n",
        "nocompletion": f"{good}\n\n" + json.dumps({"task_id": "HumanEval/1"}) + "\n",
        "unknown": good + "\n" + json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    out = str(tmp_path / "o.json")
    cases = [
        (["--samples", str(tmp_path / "badjson.jsonl"), "--task", "humaneval", "--json", out], "line 2 is not valid JSON"),
        (["--samples", str(tmp_path / "nocompletion.jsonl"), "--task", "humaneval", "--json", out],
         'line 3 needs a "task_id" and a string "completion"'),
        (["--samples", str(tmp_path / "unknown.jsonl"), "--task", "humaneval", "--json", out],
         "1 samples have task ids that are not humaneval problems: HumanEval/999"),
        (["--samples", str(tmp_path / "missing.jsonl"), "--task", "humaneval", "--json", out], "not found"),
        (["--samples", str(tmp_path / "unknown.jsonl"), "--json", out], "--samples needs --task"),
        (["--samples", str(tmp_path / "unknown.jsonl"), "--task", "humaneval,mbpp", "--json", out], "evaluates one task"),
        (["--reference", "--task", "humaneval,gsm8k", "--json", out], "unknown task gsm8k"),
        (["--reference", "--task", "apps", "--json", out], "APPS is not in the data directory"),
        (["--reference", "--task", "apps", "--apps", str(tmp_path / "no"), "--json", out], "does not exist"),
        (["--reference", "--task", "humaneval"], "--json OUT is needed"),
        (["--reference", "--samples", "x.jsonl"], "exactly one of"),
        (["--checkpoint", str(tmp_path / "no-such-run")], "does not exist"),
        (["--reference", "--task", "mbpp", "--data-dir", str(tmp_path / "nodata"), "--json", out], "does not exist"),
        (["--reference", "--task", "mbpp", "--temperatures", "0.1,hot", "--json", out], "comma-separated numbers"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, err)
        assert lines[0].startswith("bytelm eval: error: ")
    assert not (tmp_path / "o.json").exists()
