"""`bytelm eval --checkpoint`: a tiny untrained CPU checkpoint, sampled and executed end to
end, with pass@k per temperature and at the oracle temperature logged to its MLflow run.
Its context (1,024 bytes) holds the first HumanEval prompts but not MBPP's three-shot ones
(about 1.8 kB), which must score 0 rather than vanish from the benchmark."""

import json

import pandas as pd
import pytest
import torch

from bytelm.checkpoint import save_checkpoint
from bytelm.cli import main as bytelm
from bytelm.config import config_from_dict, to_dict
from bytelm.fileio import read_jsonl
from bytelm.generate import Decoder
from bytelm.model import MTPTransformer
from bytelm.tokenizers import ByteTokenizer
from bytelm.tracking import Tracker, mlflow_client


@pytest.mark.slow
def test_checkpoint_mode_end_to_end(tmp_path, monkeypatch, capsys, mlflow_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    cfg = config_from_dict({
        "model": {"n_layers": 3, "d_model": 32, "n_heads": 2, "context": 1024, "vocab_size": 258, "n_future": 2},
        "eval": {"n_samples": 3, "temperatures": [0.5]},  # the run's own defaults; flags override them below
    })
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    with Tracker(run_dir, to_dict(cfg), experiment="eval-test", run_name="tiny", use_mlflow=True) as t:
        t.set_status("finished")
    save_checkpoint(run_dir, "step_0000001", MTPTransformer(cfg.model), cfg, ByteTokenizer(), {"step": 1})
    # the prompts each Decoder.run gets, in order (the real method runs)
    prompt_lengths = []
    run = Decoder.run
    monkeypatch.setattr(Decoder, "run", lambda self, prompts, *a, **kw: prompt_lengths.append(list(map(len, prompts)))
                        or run(self, prompts, *a, **kw))

    with pytest.raises(SystemExit) as e:
        bytelm(["eval", "--checkpoint", str(run_dir), "--task", "humaneval,mbpp", "--n-samples", "2",
                "--temperatures", "0.2,0.8", "--max-problems", "3", "--batch-size", "4", "--device", "cpu",
                "--max-new-tokens", "32", "--attention", "math"])
    assert e.value.code == 0
    # shortest prompts first (HumanEval/2, /0, /1: 331, 348, 506 bytes), each sample of a
    # problem beside the others; MBPP's prompts do not fit the context, so nothing decodes
    assert prompt_lengths == [[332] * 2 + [349] * 2 + [507] * 2] * 2

    out = run_dir / "eval" / "pass_at_k.json"
    summary = json.loads(out.read_text())
    assert summary["n_samples"] == 2 and summary["temperatures"] == [0.2, 0.8]
    assert summary["heads"] == 2  # by default the model's heads (here 2): self-speculative sampling
    assert summary["attention"] == "math"
    assert summary["tasks"]["humaneval"]["prompts_too_long"] == 0 and summary["tasks"]["mbpp"]["prompts_too_long"] == 3
    for task in ("humaneval", "mbpp"):
        s = summary["tasks"][task]
        assert set(s["by_temperature"]) == {"0.2", "0.8"} and s["n_problems"] == 3
        for sc in s["by_temperature"].values():
            assert sc["n_samples"] == 6 and set(sc["pass_at_k"]) == {"1"} and 0 <= sc["pass_at_k"]["1"] <= 1
        assert s["best"]["1"]["temperature"] in (0.2, 0.8)
    # the decoder's counters per temperature: 3 problems x 2 samples, at most 2 tokens per
    # forward with 2 heads; MBPP's prompts did not fit, so nothing was decoded for it
    for dec in summary["tasks"]["humaneval"]["decoding"].values():
        assert dec["heads"] == 2 and dec["sequences"] == 6 and len(dec["acceptance_by_depth"]) == 1
        assert 0 < dec["tokens"] <= 2 * dec["row_forwards"] and dec["steps"] > 0 and dec["wall_s"] > 0
    assert set(summary["tasks"]["humaneval"]["decoding"]) == {"0.2", "0.8"} and summary["tasks"]["mbpp"]["decoding"] == {}
    results = read_jsonl(run_dir / "eval" / "pass_at_k.results.jsonl")
    assert len(results) == 2 * 2 * 3 * 2  # tasks x temperatures x problems x samples
    # in the benchmark's order, whatever order they were decoded in
    assert [(r["task_id"], r["sample"]) for r in results[:6]] == [(f"HumanEval/{j}", i) for j in range(3) for i in range(2)]
    assert {r["status"] for r in results} <= {"passed", "failed", "timeout", "error"}
    assert all(isinstance(r["completion"], str) and r["network_isolated"] for r in results)
    # an untrained model writes bytes, not code: nothing passes, every program still ran
    assert not any(r["passed"] for r in results)
    assert all(r["completion"] == "" and r["reason"] == "prompt longer than the model's context (1024)"
               for r in results if r["task"] == "mbpp")

    info = json.loads((run_dir / "mlflow.json").read_text())
    client = mlflow_client(info["tracking_uri"])
    metrics = client.get_run(info["run_id"]).data.metrics
    for task in ("humaneval", "mbpp"):
        for name in ("t0.2", "t0.8", "best", "best_t"):
            assert f"pass_at_1/{task}/{name}" in metrics
        assert metrics[f"pass_at_1/{task}/best"] == max(metrics[f"pass_at_1/{task}/t0.2"], metrics[f"pass_at_1/{task}/t0.8"])
    artifacts = {a.path for a in client.list_artifacts(info["run_id"], "eval")}
    assert artifacts == {"eval/pass_at_k.json", "eval/pass_at_k.results.jsonl", "eval/passk_problems"}
    # per task and temperature, each problem's samples and passes (the report's intervals
    # over problems rest on them), in the benchmark's order, as the results file counts them
    assert {a.path for a in client.list_artifacts(info["run_id"], "eval/passk_problems")} == {
        f"eval/passk_problems/{task}_t{t}.json" for task in ("humaneval", "mbpp") for t in ("0.2", "0.8")}
    for task, prefix in (("humaneval", "HumanEval"), ("mbpp", "MBPP")):
        for t in (0.2, 0.8):
            counts = json.loads((run_dir / "eval" / "passk_problems" / f"{task}_t{t}.json").read_text())
            ids = [r["task_id"] for r in results if r["task"] == task and r["temperature"] == t][::2]
            assert counts["task_ids"] == ids and ids[0].startswith(prefix) and len(ids) == 3
            assert counts["n"] == [2, 2, 2] and counts["c"] == [0, 0, 0] and counts["step"] == 1
            assert counts["temperature"] == t and counts["n_problems_in_task"] in (164, 500)
            assert counts["generated"] == [task == "humaneval"] * 3  # MBPP's prompts did not fit: none drawn
    # the report reads them back from MLflow: nothing passed, so every pass@k is at the floor, and says so
    from analysis.passk_ci import floor_bound
    from analysis.report import build_report

    report, _, _ = build_report("eval-test", info["tracking_uri"], tmp_path / "report")
    ci = pd.read_csv(tmp_path / "report" / "passk_ci.csv")
    assert set(ci["task"]) == {"humaneval", "mbpp"} and ci["floor"].all()
    assert (ci["problems"] == 3).all() and (ci["samples"] == 2).all() and (ci["lo"] == 0).all() and (ci["hi"] == 0).all()
    assert "pass@k is at the floor everywhere" in report.read_text()
    # HumanEval's 6 samples bound pass@1 from above; MBPP's zeros were never drawn and bound nothing
    assert ci[ci["task"] == "humaneval"]["floor_bound"].tolist() == pytest.approx([floor_bound(6, 1)] * 2)  # run, config
    assert ci[ci["task"] == "mbpp"]["floor_bound"].isna().all()
    assert "not a measurement: no sample was generated" in report.read_text()

    # an unknown attention kernel: one line, exit 2, nothing written
    bad = tmp_path / "bad.json"
    with pytest.raises(SystemExit) as e:
        bytelm(["eval", "--checkpoint", str(run_dir), "--task", "humaneval", "--n-samples", "1", "--max-problems", "1",
                "--device", "cpu", "--attention", "sparse", "--json", str(bad)])
    assert e.value.code == 2 and not bad.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("bytelm eval: error: --attention must be one of auto, efficient, math, cudnn, flex, "
                       "got 'sparse'")


def test_prompts_longer_than_the_context(tmp_path, monkeypatch, capsys, mlflow_store):
    """A context shorter than every prompt: the console says how many samples were not
    generated and why, and the command fails unless asked not to; --truncate-prompts
    generates from each prompt's last tokens and records it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    cfg = config_from_dict({"model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "context": 64, "vocab_size": 258}})
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, "step_0000001", MTPTransformer(cfg.model), cfg, ByteTokenizer(), {"step": 1})
    common = ["eval", "--checkpoint", str(run_dir), "--task", "humaneval", "--n-samples", "2", "--temperatures", "0.8",
              "--max-problems", "2", "--device", "cpu", "--max-new-tokens", "8"]

    def run(*extra: str) -> tuple[int, dict, str]:
        out = tmp_path / f"passk{len(extra)}.json"
        with pytest.raises(SystemExit) as e:
            bytelm([*common, *extra, "--json", str(out)])
        captured = capsys.readouterr()
        capsys_out.append(captured.out)
        return e.value.code, json.loads(out.read_text()), captured.err

    capsys_out: list[str] = []

    code, summary, err = run()
    assert "humaneval: pass@k over 2 of 164 problems, 2 samples per problem and temperature; 0 samples generated" in \
        capsys_out[-1]
    s = summary["tasks"]["humaneval"]
    assert code == 1 and s["prompts_too_long"] == 2 and s["samples_generated"] == 0 and s["samples_not_generated"] == 4
    assert ("humaneval: 2 of 2 prompts are longer than the model's context (64 tokens): 4 of 4 samples were not "
            "generated and score 0") in err
    assert "error: no sample could be generated" in err

    code, _, err = run("--allow-no-samples")
    assert code == 0 and "4 of 4 samples were not generated" in err

    code, summary, err = run("--truncate-prompts")
    s = summary["tasks"]["humaneval"]
    assert code == 0 and summary["truncate_prompts"] and s["prompts_truncated"] == 2 and s["samples_generated"] == 4
    assert "2 of 2 prompts were longer than the context (64 tokens) and were cut to their last tokens" in err
    results = read_jsonl(tmp_path / "passk1.results.jsonl")
    assert len(results) == 4 and all(r["prompt_truncated"] and r["reason"] != "prompt longer than the model's context (64)"
                                     for r in results)
    assert summary["metrics"]["eval/humaneval/problems_in_task"] == 164
    assert summary["metrics"]["eval/humaneval/samples_generated"] == 4
    assert summary["metrics"]["summary/pass_at_1_humaneval"] == summary["metrics"]["pass_at_1/humaneval/best"]
