"""`bytelm decode-bench` end to end: a checkpoint trained by `bytelm train` on the smoke
corpus, the real CLI in a subprocess, the JSON it writes and the MLflow run it logs to."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from bytelm.config import ModelConfig, load_config
from bytelm.decode_bench import explain_mismatch, heads_to_run, select_prompts, timed_runs
from bytelm.errors import UserError
from bytelm.generate import Decoder
from bytelm.model import MTPTransformer
from bytelm.paths import config_path
from bytelm.tokenizers import ByteTokenizer
from bytelm.train import train

SMOKE = config_path("configs/smoke.yaml")
# One worker trains the module's checkpoint once (scripts/test.sh runs --dist loadgroup).
pytestmark = pytest.mark.xdist_group("decode_bench")
ROW_FIELDS = {"heads_used", "batch_size", "bytes_per_forward", "tokens_per_forward", "speedup", "acceptance_by_depth",
              "sequences", "mismatched_sequences", "baseline", "tokens_per_s", "bytes_per_s", "efficiency"}


@pytest.fixture(scope="module")
def run_dir(smoke_data, tmp_path_factory, empty_mlflow_db):
    """A 4-head byte model trained for 20 steps, logged to a SQLite MLflow store."""
    root = tmp_path_factory.mktemp("bench")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")  # as the mlflow_store fixture does, once for the module
    store = f"sqlite:///{root / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = store
    try:
        cfg = load_config(SMOKE, [f"data.root={smoke_data}", "model.n_future=4", "train.steps=20",
                                  "train.eval_every=1000", "train.checkpoint_every=20"])
        train(cfg, root / "run")
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return root / "run"


def bench(run_dir, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir.parent / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bytelm", "decode-bench", "--checkpoint", str(run_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=run_dir.parent, timeout=600)


@pytest.mark.slow
def test_bench_writes_rows_and_logs_to_mlflow(run_dir):
    out = run_dir.parent / "bench.json"
    # 4 prompts through batch 3: a finished slot takes the queue's last prompt, after a
    # second slot is free (--refill-min 2)
    p = bench(run_dir, "--prompts", "code", "--heads", "1,2,4", "--batch-sizes", "1,3", "--n-prompts", "4",
              "--prompt-len", "48", "--max-new", "24", "--refill-min", "2", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "speedup" in p.stdout and "P(drafts 1..j accepted)" in p.stdout  # the table
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["heads_used"], r["batch_size"]) for r in rows] == [(k, b) for b in (1, 3) for k in (1, 2, 4)]
    for r in rows:
        assert ROW_FIELDS <= set(r)
        assert r["sequences"] == 4
        assert r["mismatched_sequences"] == 0  # float32 on CPU: exactly plain greedy
        assert r["mismatches"] == [] and r["largest_mismatch_gap"] is None
        assert len(r["acceptance_by_depth"]) == r["heads_used"] - 1
        assert 1.0 <= r["tokens_per_forward"] <= r["heads_used"]
        assert r["bytes_per_forward"] == pytest.approx(r["tokens_per_forward"], rel=0.1)  # a byte model
        assert r["speedup"] > 0 and "plain greedy" in r["baseline"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["tokens_per_forward"] == 1.0
    assert result["setup"]["prompts"] == "code" and result["setup"]["prompt_len_bytes"] == 48
    assert result["setup"]["refill_min"] == 2 and result["setup"]["step"] == json.loads(
        (run_dir / "status.json").read_text())["step"]

    info = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    metrics = client.get_run(info["run_id"]).data.metrics
    assert metrics["spec/code/b3/k4/mismatched"] == 0
    assert metrics["spec/code/b1/k2/tokens_per_forward"] == pytest.approx(rows[1]["tokens_per_forward"])
    assert "spec/code/b3/k1/speedup" in metrics and "spec/code/b1/k4/bytes_per_s" in metrics
    artifacts = [a.path for a in client.list_artifacts(info["run_id"])]
    assert "bench.json" in artifacts and "bench.png" in artifacts  # the JSON and the run's own plot
    # the legend under the table; every repeat's wall time, the spread and the load
    assert "columns:" in p.stdout and "flags " in p.stdout
    assert all(len(r["repeat_wall_s"]) == 1 and r["wall_spread"] == 0 and r["load_avg"] >= 0 for r in rows)
    assert "load_avg_before" in result["setup"] and "cores" in result["setup"]
    # speedup against heads used as one curve per batch size (step = heads), and the run's
    # headline speedups from the rows not flagged
    curve = client.get_metric_history(info["run_id"], "speedup/code/b1")
    assert sorted((m.step, m.value) for m in curve) == [(r["heads_used"], pytest.approx(r["speedup"]))
                                                        for r in rows if r["batch_size"] == 1]
    for b in (1, 3):
        good = [r["speedup"] for r in rows if r["batch_size"] == b and r["heads_used"] > 1 and not r["flags"]]
        assert metrics.get(f"summary/speedup_b{b}") == (pytest.approx(max(good)) if good else None)


@pytest.mark.slow
def test_bench_stories_prompts_default_output(run_dir):
    """Also two attention kernels: every decoder runs with each, the fastest plain one is
    the baseline of every row, and FlexAttention's decoders give plain greedy's bytes."""
    p = bench(run_dir, "--prompts", "stories", "--heads", "4", "--batch-sizes", "2", "--n-prompts", "2",
              "--prompt-len", "40", "--max-new", "8", "--attention", "auto,flex")
    assert p.returncode == 0, p.stderr
    out = run_dir / "bench" / "decode_stories_cpu_float32.json"
    rows = json.loads(out.read_text())["rows"]
    assert [(r["heads_used"], r["attention"]) for r in rows] == [(1, "auto"), (1, "flex"), (4, "auto"), (4, "flex")]
    assert all(r["mismatched_sequences"] == 0 for r in rows)
    fastest = max(rows[:2], key=lambda r: r["speedup"])
    assert fastest["speedup"] == 1.0 and min(r["speedup"] for r in rows[:2]) <= 1.0
    assert all(f"attention {fastest['attention']} (the fastest plain decoder" in r["baseline"] for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--heads", "1,8"], "asks for 8 heads, but the checkpoint has 4"),
    (["--prompt-len", "255"], "does not fit the model's context of 256"),
    (["--prompts", "nowhere.jsonl"], "neither code, stories nor an existing JSONL file"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs --device cuda"),
    (["--batch-sizes", "0"], "--batch-sizes takes integers >= 1"),
    (["--attention", "auto,fast"], "--attention takes a comma-separated list of"),
    (["--refill-min", "-1"], "--refill-min must be >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, args, message):
    p = bench(run_dir, *args)
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr


def test_heads_to_run():
    assert heads_to_run(None, 8) == [1, 2, 4, 8]
    assert heads_to_run(None, 6) == [1, 2, 4, 6]
    assert heads_to_run("8,2", 32) == [1, 2, 8]
    with pytest.raises(UserError, match="no extra heads"):
        heads_to_run("2", 1)
    with pytest.raises(UserError, match="no extra heads"):
        heads_to_run(None, 1)


def test_select_prompts_cuts_whole_characters():
    docs = ["short".encode(), ("é" * 10).encode(), b"x" * 30]
    assert select_prompts(docs, 2, 7, keep_short=False) == [("é" * 3).encode(), b"x" * 7]
    assert select_prompts(docs, 5, 7, keep_short=True)[0] == b"short"
    assert select_prompts(docs, 1, None, keep_short=True) == [b"short"]


def test_more_prompts_than_documents_take_their_later_windows():
    docs = [b"a" * 21, b"b" * 7, b"short", b"c" * 14]
    assert select_prompts(docs, 10, 7, keep_short=False) == [b"a" * 7, b"b" * 7, b"c" * 7, b"a" * 7, b"c" * 7, b"a" * 7]
    assert select_prompts(docs, 4, 7, keep_short=False) == [b"a" * 7, b"b" * 7, b"c" * 7, b"a" * 7]
    # a window that starts or ends inside a character keeps the whole characters only
    assert select_prompts([("é" * 10).encode()], 3, 7, keep_short=False) == [("é" * 3).encode()] * 2
    assert select_prompts([b"x" * 3], 2, 7, keep_short=False) == []


@pytest.mark.parametrize("repeats", [1, 3, 4])
def test_timed_runs_returns_the_median_run_whole(repeats):
    """The row's wall time and its statistics come from one run, the median one (the lower
    middle of an even number), not the median wall beside another run's counters. The
    real runs' wall times are overwritten with a known order (the first timed run the
    slowest but one) so that the median run is a known one."""
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(n_layers=2, d_model=32, n_heads=4, context=64, vocab_size=258, n_future=2)).eval()
    decoder = Decoder(model, heads=2, batch_size=2, max_len=48)
    walls = iter([0.5, 30.0, 10.0, 20.0, 40.0])  # the warm-up, then the timed runs
    runs = []
    real_run = decoder.run

    def run_with_known_wall(*args, **kwargs):
        gen = real_run(*args, **kwargs)
        gen.stats.wall_s = next(walls)
        runs.append(gen)
        return gen

    decoder.run = run_with_known_wall
    timed = timed_runs(decoder, [[257, 97, 98], [257, 99]], 12, ByteTokenizer(), repeats)
    assert len(runs) == 1 + repeats
    assert timed.gen is runs[1 if repeats == 1 else 3]  # the timed walls: 30 | 30 10 20 | 30 10 20 40
    assert timed.walls == sorted([30.0, 10.0, 20.0, 40.0][:repeats])  # every repeat, for the spread
    assert timed.load_avg >= 0


def test_rows_whose_timing_is_not_a_result_are_flagged():
    """Repeats that disagree (the row's or its baseline's), a load above the cores, and a
    speedup above tokens per forward each flag a row, saying why; a clean row has none."""
    from bytelm.decode_bench import row_flags, spread

    assert spread([1.0]) == 0.0 and spread([1.0, 1.05, 1.3]) == pytest.approx(0.3 / 1.05)
    clean = {"wall_spread": 0.02, "baseline_wall_spread": 0.05, "load_avg": 1.0, "baseline_load_avg": 0.5,
             "speedup": 1.8, "tokens_per_forward": 1.9}
    assert row_flags(clean, cores=2) == []
    assert row_flags({**clean, "baseline_wall_spread": 0.4}, 2) == ["repeats disagree: wall times spread 40% (over 10%)"]
    assert row_flags({**clean, "load_avg": 6.2}, 2) == ["busy machine: load average 6.2 on 2 cores"]
    assert row_flags({**clean, "speedup": 2.5}, 2) == ["impossible: speedup 2.50 above 1.90 tokens per forward"]


@torch.no_grad()
def test_explain_mismatch_gives_the_first_difference_and_head_1s_gap():
    """A completion that takes head 1's second choice at position 3 is explained there: both
    tokens, the top-2 gap of a no-cache forward, and its own token's gap equal to it."""
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(n_layers=2, d_model=32, n_heads=4, context=64, vocab_size=258, n_future=2)).double().eval()
    prompt, plain = [257, 97, 98], []
    for _ in range(6):
        plain.append(int(model(torch.tensor([prompt + plain]), n_heads=1)[0, -1, 0].argmax()))
    logits = model(torch.tensor([prompt + plain[:3]]), n_heads=1)[0, -1, 0]
    top = logits.topk(2)
    spec = plain[:3] + [int(top.indices[1])] + plain[4:]
    out = explain_mismatch(model, prompt, plain, spec)
    assert out["first_difference"] == 3 and out["plain_token"] == plain[3] and out["speculative_token"] == spec[3]
    assert out["top2_logit_gap"] == pytest.approx(float(top.values[0] - top.values[1])) and out["top2_logit_gap"] > 0
    assert out["speculative_token_gap"] == pytest.approx(out["top2_logit_gap"])
    # a completion that stops early differs only in length: no logits to explain
    assert explain_mismatch(model, prompt, plain, plain[:4]) == {"first_difference": 4, "plain_length": 6, "speculative_length": 4}


def tree_fit(run_dir, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bytelm", "tree-fit", "--checkpoint", str(run_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=run_dir.parent, timeout=600)


@pytest.mark.slow
def test_tree_fit_is_reproducible_and_trees_decode_like_plain_greedy(run_dir, tmp_path):
    """tree-fit twice gives the same file; decode-bench --tree runs its trees beside the
    chains with no mismatch (float32) and records the tree size to use per batch; a tree
    file fitted to other weights is refused."""
    from bytelm.checkpoint import resolve_checkpoint

    args = ("--nodes", "8", "--n-prompts", "4", "--prompt-len", "48", "--max-new", "24")
    p = tree_fit(run_dir, *args)
    assert p.returncode == 0, p.stderr
    ckpt = resolve_checkpoint(run_dir)
    first = (ckpt / "trees.json").read_text()
    assert tree_fit(run_dir, *args).returncode == 0
    assert (ckpt / "trees.json").read_text() == first
    data = json.loads(first)
    assert data["nodes"] == 8 and len(data["paths"]) == 7 and data["heads"] == 4
    rates = [p["rate"] for p in data["paths"]]
    assert rates == sorted(rates, reverse=True) and 0 < rates[0] <= 1
    assert all(len(p["path"]) <= 3 for p in data["paths"])
    assert set(data["tokens_per_forward"]) == {"4", "8"}

    out = tmp_path / "bench.json"
    p = bench(run_dir, "--heads", "1,4", "--batch-sizes", "1,3", "--n-prompts", "4", "--prompt-len", "48",
              "--max-new", "24", "--tree", "4,8", "--json", str(out))
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["decoder"], r["nodes"], r["batch_size"]) for r in rows] == [
        (d, n, b) for b in (1, 3) for d, n in (("chain", 1), ("chain", 4), ("tree", 4), ("tree", 8))]
    assert all(r["mismatched_sequences"] == 0 for r in rows)
    assert set(result["tree_choice"]) == {"1", "3"}
    assert result["tree_choice"]["1"]["nodes"] in (4, 8)
    # tree-fit's prediction for these prompts is what the decoder did
    for r in rows:
        if r["heads_used"] == 4:
            want = data["chain_tokens_per_forward"] if r["decoder"] == "chain" else data["tokens_per_forward"][str(r["nodes"])]
            assert r["tokens_per_forward"] == pytest.approx(want, rel=1e-9), r

    # the same tree file beside other weights
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    other.mkdir()
    for f in ckpt.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] * 1.01
    save_file(weights, str(other / "model.safetensors"))
    p = bench(other, "--heads", "1,4", "--batch-sizes", "1", "--n-prompts", "1", "--prompt-len", "48",
              "--max-new", "8", "--tree", "8", "--json", str(tmp_path / "x.json"))
    assert p.returncode != 0 and "fitted to other weights" in p.stderr and "Traceback" not in p.stderr
    p = bench(run_dir, "--heads", "1,4", "--batch-sizes", "1", "--tree", "16", "--json", str(tmp_path / "y.json"))
    assert p.returncode != 0 and "tree-fit --nodes 16" in p.stderr


def test_a_prompt_file_is_read_line_by_line_with_clear_errors(tmp_path):
    from bytelm.decode_bench import documents

    f = tmp_path / "prompts.jsonl"
    f.write_text('"def f():"\n\n{"prompt": "x = 1"}\n')
    assert documents(str(f), None, None) == ("prompts", [b"def f():", b"x = 1"], True)
    f.write_text('"a"\n{"prompt": ""}\n')
    with pytest.raises(UserError, match="line 2 holds no prompt"):
        documents(str(f), None, None)
    f.write_text('"a"\n{"prompt": \n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        documents(str(f), None, None)
