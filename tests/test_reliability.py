"""The suite under a hostile user: outputs that are not ours, killed runs' leftovers,
planted checkpoint payloads, changed configs on resume, full disks and unwritable paths.
Each case is a row of docs/reliability.md."""

import contextlib
import gzip
import json
import os
import pickle
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from bytelm import checkpoint as ckpt
from bytelm.cli import main as bytelm
from bytelm.config import load_config
from bytelm.errors import UserError
from bytelm.fileio import atomic_path, check_output, write_json
from bytelm.paths import data_file
from bytelm.train import train

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "configs" / "smoke.yaml"


def run_cli(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of `bytelm ARGV`, in this process (a traceback would raise here)."""
    with pytest.raises(SystemExit) as e:
        bytelm(argv)
    _, err = capsys.readouterr()
    return e.value.code, err


def one_line(err: str) -> str:
    """The one error line of stderr (progress bars and warnings aside)."""
    lines = [line for line in err.splitlines() if line.startswith("bytelm ") and ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def smoke_args(smoke_data, *extra):
    return [f"data.root={smoke_data}", "tracking.mlflow=false", "train.steps=2", "train.eval_every=2",
            "train.checkpoint_every=2", "train.log_every=1", "model.n_layers=1", "model.d_model=32", *extra]


@pytest.fixture(scope="module")
def smoke_run(smoke_data, tmp_path_factory):
    """A finished 2-step run directory (a template: tests copy it before changing it)."""
    run = tmp_path_factory.mktemp("smoke_run") / "run"
    train(load_config(SMOKE, smoke_args(smoke_data)), run)
    return run


@pytest.fixture
def run_copy(smoke_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(smoke_run, dst)
    return dst


def train_argv(run_dir, smoke_data, *extra):
    argv = ["train", "--config", str(SMOKE), "--run-dir", str(run_dir)]
    for o in smoke_args(smoke_data, *extra):
        argv += ["--set", o]
    return argv


def samples_file(tmp_path, task_id="HumanEval/0") -> Path:
    with gzip.open(data_file("humaneval/HumanEval.jsonl.gz"), "rt") as f:
        row = json.loads(f.readline())
    p = tmp_path / "S.jsonl"
    p.write_text(json.dumps({"task_id": task_id, "completion": row["canonical_solution"]}) + "\n")
    return p


# ----------------------------------------------------------------------------- data loss


def test_a_folder_that_is_not_ours_is_never_replaced(tmp_path):
    user = tmp_path / "d"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is a folder"):
        write_json(user, {"x": 1})
    with pytest.raises(UserError, match="no meta.json"):
        with atomic_path(user, marker="meta.json") as tmp:
            tmp.mkdir()
            (tmp / "meta.json").write_text("{}")
    assert (user / "notes.txt").read_text() == "mine"
    link = tmp_path / "link.json"
    link.symlink_to(user / "notes.txt")
    with pytest.raises(UserError, match="symbolic link"):
        write_json(link, {})
    assert (user / "notes.txt").read_text() == "mine"
    # a folder the command made (its marker is there) is replaced whole
    ours = tmp_path / "ours"
    for text in ("1", "2"):
        with atomic_path(ours, marker="meta.json") as tmp:
            tmp.mkdir()
            (tmp / "meta.json").write_text(text)
    assert (ours / "meta.json").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["d", "link.json", "ours"]


def test_an_output_equal_to_an_input_is_refused(tmp_path):
    src = tmp_path / "S.jsonl"
    src.write_text("keep\n")
    with pytest.raises(UserError, match="also an input"):
        check_output(tmp_path / "." / "S.jsonl", inputs=[src])
    assert src.read_text() == "keep\n"


def test_decode_bench_json_naming_the_run_directory_deletes_nothing(run_copy, capsys):
    before = sorted(p.relative_to(run_copy) for p in run_copy.rglob("*"))
    code, err = run_cli(["decode-bench", "--checkpoint", str(run_copy), "--json", str(run_copy), "--device", "cpu"], capsys)
    assert code == 2 and "also an input" in one_line(err)
    assert sorted(p.relative_to(run_copy) for p in run_copy.rglob("*")) == before


def test_eval_json_naming_a_user_folder_or_the_samples_file_is_refused(tmp_path, capsys):
    samples = samples_file(tmp_path)
    user = tmp_path / "d"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    code, err = run_cli(["eval", "--samples", str(samples), "--task", "humaneval", "--json", str(user)], capsys)
    assert code == 2 and "is a folder" in one_line(err)
    assert (user / "notes.txt").read_text() == "mine"
    text = samples.read_text()
    code, err = run_cli(["eval", "--samples", str(samples), "--task", "humaneval", "--json", str(samples)], capsys)
    assert code == 2 and "also an input" in one_line(err)
    assert samples.read_text() == text


def test_report_plots_are_written_atomically(tmp_path, monkeypatch):
    """A figure interrupted while it is drawn leaves no file (kill -9 left 0-byte PNGs)."""
    import matplotlib.pyplot as plt

    from analysis import plots

    fig = plt.figure()

    def dies_midway(path, **kw):
        Path(path).write_bytes(b"\x89PNG")  # a first chunk, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        plots._save(fig, tmp_path / "passk_vs_k.png")
    assert os.listdir(tmp_path) == []


def test_temporaries_of_killed_runs_are_removed_by_the_next_save(run_copy, smoke_data):
    """`checkpoints/.step_*` of a process that died, and those of the earlier naming, go at
    the next checkpoint; a live process's temporary stays."""
    cks = ckpt.checkpoints_dir(run_copy)
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [cks / f".step_0000004.~{dead.pid}@{host}~abc123", cks / ".step_0000002.k2j4_x9a"]
    alive = cks / f".step_0000006.~{os.getpid()}@{host}~def456"
    other_host = cks / f".step_0000008.~{dead.pid}@elsewhere~ghi789"
    for d in (*stale, alive, other_host):
        (d / d.name.split(".")[1]).mkdir(parents=True)
    train(load_config(SMOKE, smoke_args(smoke_data, "train.steps=4")), run_copy)
    assert not any(d.exists() for d in stale)
    assert alive.exists() and other_host.exists()


def test_temporaries_of_a_killed_shard_writer_are_removed_by_the_next_one(tmp_path):
    """`.train.*` beside a split folder, left by a prepare killed mid-write."""
    import numpy as np

    from bytelm.shards import ShardWriter

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".train.~{dead.pid}@{socket.gethostname()}~abc123"
    (stale / "train").mkdir(parents=True)
    legacy = tmp_path / ".train.x1y2z3w4"
    (legacy / "train").mkdir(parents=True)
    mine = tmp_path / ".train.mynotes1"  # named like an old temporary, but holding a user's file
    (mine / "todo.txt").parent.mkdir()
    (mine / "todo.txt").write_text("keep")
    with ShardWriter(tmp_path / "train", "uint8", None, {}, 1 << 10) as w:
        w.add(np.frombuffer(b"abc", dtype=np.uint8), 3)
    assert sorted(os.listdir(tmp_path)) == [".train.mynotes1", "train"]


# ----------------------------------------------------------------------------- untrusted files


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["optim.pt", "rng.pt"])
def test_a_planted_payload_in_a_checkpoint_never_runs(run_copy, smoke_data, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    with open(ckpt.list_checkpoints(run_copy)[-1] / name, "wb") as f:
        pickle.dump({"optimizer": _Payload(marker), "python": _Payload(marker)}, f)
    code, err = run_cli(train_argv(run_copy, smoke_data, "train.steps=4"), capsys)
    assert code == 2 and "refusing to load" in one_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("damage,message", [
    ("truncate optim.pt", "corrupt or truncated"),
    ("remove rng.pt", "has no rng.pt"),
    ("negative step", "no valid step"),
])
def test_a_damaged_checkpoint_is_one_line(run_copy, smoke_data, capsys, damage, message):
    last = ckpt.list_checkpoints(run_copy)[-1]
    if damage == "truncate optim.pt":
        f = last / "optim.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "remove rng.pt":
        (last / "rng.pt").unlink()
    else:
        state = json.loads((last / "state.json").read_text())
        (last / "state.json").write_text(json.dumps({**state, "step": -3}))
    code, err = run_cli(train_argv(run_copy, smoke_data, "train.steps=4"), capsys)
    assert code == 2 and message in one_line(err)


def test_resume_loads_checkpoints_written_before_the_rng_change(run_copy, smoke_data):
    """rng.pt of earlier versions holds numpy's key array; it still loads (weights_only)."""
    import random

    import numpy as np
    import torch

    last = ckpt.list_checkpoints(run_copy)[-1]
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               last / "rng.pt")
    assert train(load_config(SMOKE, smoke_args(smoke_data, "train.steps=4")), run_copy)["step"] == 4


# ----------------------------------------------------------------------------- wrong without a word


def test_resuming_with_a_changed_learning_setting_names_the_keys(run_copy, smoke_data, capsys):
    code, err = run_cli(train_argv(run_copy, smoke_data, "train.steps=4", "train.lr=0.1", "train.seed=7"), capsys)
    line = one_line(err)
    assert code == 2 and "train.lr" in line and "train.seed" in line and "train.steps" not in line
    # the keys that only say when and how the run goes on may change
    assert train(load_config(SMOKE, smoke_args(smoke_data, "train.steps=4", "train.log_every=2")), run_copy)["step"] == 4


# ----------------------------------------------------------------------------- one line, not a traceback


def test_a_non_utf8_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  steps: 3 # \xff\xfe\n")
    code, err = run_cli(["train", "--config", str(bad), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "not UTF-8" in one_line(err)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (root only): a disk that fills up."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small tmpfs needs root")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mount is not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_while_training_is_one_line(smoke_data, tmp_path, capsys):
    with small_disk(tmp_path / "disk", "96k") as disk:
        code, err = run_cli(train_argv(disk / "run", smoke_data), capsys)
        line = one_line(err)
        assert code == 1 and "No space left on device" in line and str(disk / "run") in line
        assert not ckpt.list_checkpoints(disk / "run")  # no half-written checkpoint
        assert not [p for p in (disk / "run" / "checkpoints").glob(".*")]


def test_torch_save_on_a_full_disk_is_an_oserror_naming_the_file(tmp_path):
    """torch.save reports a full disk as RuntimeError("... unexpected pos ...")."""
    import errno

    import torch

    with small_disk(tmp_path / "disk", "64k") as disk:
        with pytest.raises(OSError) as e:
            ckpt._save_torch({"x": torch.zeros(1 << 16)}, disk / "optim.pt")
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(disk / "optim.pt")


@pytest.mark.parametrize("where", ["/proc/bytelm-x/out.json", "under a file"])
def test_an_uncreatable_output_path_is_one_line(tmp_path, capsys, where):
    samples = samples_file(tmp_path)
    if where == "under a file":
        where = str(samples) + "/out.json"
    code, err = run_cli(["eval", "--samples", str(samples), "--task", "humaneval", "--json", where], capsys)
    assert code in (1, 2) and os.path.dirname(where) in one_line(err)


def fill(disk: Path) -> None:
    """Fills a small disk to the last byte."""
    with open(disk / "filler", "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)


def test_a_full_disk_while_evaluating_loses_nothing_and_is_one_line(tmp_path, capsys):
    samples = samples_file(tmp_path)
    with small_disk(tmp_path / "disk", "64k") as disk:
        fill(disk)
        code, err = run_cli(["eval", "--samples", str(samples), "--task", "humaneval", "--json", str(disk / "he.json"),
                             "--timeout", "120"], capsys)
        assert code == 1 and "No space left on device" in one_line(err) and str(disk) in one_line(err)
        assert sorted(os.listdir(disk)) == ["filler"]  # no half-written summary or results file


def test_a_full_disk_while_preparing_is_one_line(tmp_path, capsys):
    with small_disk(tmp_path / "disk", "512k") as disk:
        code, err = run_cli(["prepare", "--preset", "smoke", "--out", str(disk / "data"), "--workers", "1"], capsys)
        assert code == 1 and "No space left on device" in one_line(err)


def test_a_full_disk_while_reporting_is_one_line(tmp_path, capsys):
    csv = tmp_path / "runs.csv"
    csv.write_text("name,run_id,status,study,vocab,n,seed\na-s0,r1,FINISHED,ablation,bytes,1,0\n")
    with small_disk(tmp_path / "disk", "64k") as disk:
        (disk / "rep").mkdir()
        fill(disk)
        code, err = run_cli(["report", "--runs-csv", str(csv), "--out", str(disk / "rep")], capsys)
        assert code == 1 and "No space left on device" in one_line(err) and str(disk / "rep") in one_line(err)
        assert os.listdir(disk / "rep") == []  # no temporary, no cut-off file


def test_a_full_disk_while_sweeping_is_one_line(smoke_data, tmp_path, capsys):
    with small_disk(tmp_path / "disk", "64k") as disk:
        fill(disk)
        code, err = run_cli(["sweep", str(REPO / "experiments" / "sweeps" / "smoke.yaml"), "--out", str(disk / "sw"),
                             "--no-mlflow", "--set", f"data.root={smoke_data}"], capsys)
        assert code == 1 and "No space left on device" in one_line(err) and str(disk / "sw") in one_line(err)


def test_an_immutable_output_folder_is_one_line(tmp_path, capsys):
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("chattr +i needs root")
    samples = samples_file(tmp_path)
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode:
        pytest.skip("this file system has no immutable flag")
    try:
        code, err = run_cli(["eval", "--samples", str(samples), "--task", "humaneval", "--json", str(frozen / "o.json"),
                             "--timeout", "120"], capsys)
        assert code == 1 and "Operation not permitted" in one_line(err) and str(frozen) in one_line(err)
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)


# ----------------------------------------------------------------------------- counted twice


def test_a_second_trainer_on_the_same_run_directory_is_refused_and_sigterm_stops_cleanly(smoke_data, tmp_path, capsys):
    """Two `bytelm train` on one run directory doubled every metrics row and made two
    MLflow runs; SIGTERM left status.json at "running"."""
    import signal
    import sys
    import time

    from bytelm.fileio import read_jsonl

    run = tmp_path / "run"
    argv = train_argv(run, smoke_data, "train.steps=1000000", "train.checkpoint_every=1000000", "train.eval_every=1000000")
    log = tmp_path / "first.stderr"  # a file: a pipe nobody reads while it trains could fill and block it
    with open(log, "wb") as f:
        first = subprocess.Popen([sys.executable, "-m", "bytelm", *argv], stdout=subprocess.DEVNULL, stderr=f,
                                 cwd=tmp_path)
    try:
        while not read_jsonl(run / "metrics.jsonl", appending=True):  # it holds the lock, has trained a step
            assert first.poll() is None, log.read_text()
            time.sleep(0.05)  # not a busy loop: the trainer needs the core
        code, err = run_cli(argv, capsys)
        line = one_line(err)
        assert code == 2 and f"pid {first.pid} on host {socket.gethostname()}" in line and "in use" in line
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        first.kill()
    err = log.read_text()
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped"
    # the steps since the last checkpoint were saved: the run resumes where it stopped
    assert ckpt.checkpoint_step(run) == status["step"] >= 1
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl", appending=True) if "loss" in r]
    assert steps == sorted(set(steps))  # each step once


def test_a_lock_left_by_a_killed_process_is_detected_and_taken(tmp_path, capsys):
    import sys

    from bytelm.folderlock import lock_folder

    folder = tmp_path / "run"
    code = "import os, sys\nfrom bytelm.folderlock import lock_folder\nlock_folder(sys.argv[1], 'bytelm train')\nos.kill(os.getpid(), 9)\n"
    r = subprocess.run([sys.executable, "-c", code, str(folder)], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == -9
    with lock_folder(folder, "bytelm train"):
        assert "left by a process that ended without releasing it" in capsys.readouterr().err
    with lock_folder(folder, "bytelm train"):  # released cleanly: nothing to say
        assert capsys.readouterr().err == ""


def test_a_fresh_mlflow_store_opened_by_several_processes_at_once(tmp_path):
    """The first use of a SQLite store creates its tables; two processes at once made one
    die with "table ... already exists"."""
    import sys

    go = tmp_path / "go"
    code = textwrap_dedent(f"""
        import os, sys, time
        from bytelm.tracking import get_or_create_experiment, mlflow_client
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        get_or_create_experiment(mlflow_client(), "race")
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE) for _ in range(3)]
    go.touch()
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors


def textwrap_dedent(s: str) -> str:
    import textwrap

    return textwrap.dedent(s)


# ----------------------------------------------------------------------------- wrong without a word


def test_a_task_id_of_another_benchmark_is_an_error(tmp_path, capsys):
    samples = samples_file(tmp_path, task_id="MBPP/11")
    code, err = run_cli(["eval", "--samples", str(samples), "--task", "humaneval", "--json", str(tmp_path / "o.json")],
                        capsys)
    assert code == 2 and "MBPP/11" in one_line(err) and "not humaneval problems" in one_line(err)
    assert not (tmp_path / "o.json").exists()


def copy_prepared(smoke_data, dst: Path) -> Path:
    """The BPE shards of the smoke data and the files beside them (manifest, tokenizer)."""
    dst.mkdir()
    shutil.copytree(smoke_data / "bpe", dst / "bpe")
    for f in smoke_data.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def test_garbled_or_untraceable_shards_are_refused(smoke_data, tmp_path):
    from bytelm.shards import ShardDataset

    data = copy_prepared(smoke_data, tmp_path / "data")
    split = data / "bpe" / "train"
    ShardDataset(split)  # intact
    tokens = split / "tokens_00000.bin"
    raw = bytearray(tokens.read_bytes())
    raw[10:20] = bytes(reversed(raw[10:20]))  # same size, other content
    tokens.write_bytes(raw)
    with pytest.raises(UserError, match="fails its checksum"):
        ShardDataset(split)
    raw[10:20] = bytes(reversed(raw[10:20]))
    tokens.write_bytes(raw)
    (data / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json.*missing"):
        ShardDataset(split)


def test_token_ids_outside_the_vocabulary_are_one_line(smoke_data, tmp_path):
    import numpy as np

    from bytelm.shards import EDGE_BYTES, ShardDataset

    data = copy_prepared(smoke_data, tmp_path / "data")
    split = data / "bpe" / "train"
    tokens = split / "tokens_00000.bin"
    assert tokens.stat().st_size > 2 * EDGE_BYTES + 4  # the id goes where the cheap check does not look
    ids = np.memmap(tokens, dtype="<u2", mode="r+")
    ids[len(ids) // 2] = 65535
    ids.flush()
    del ids
    ds = ShardDataset(split)
    with pytest.raises(UserError, match="token id 65535 .* outside the bpe vocabulary"):
        for _ in ds.iter_eval_batches(256, 1, 1024):
            pass


@pytest.mark.parametrize("argv,message", [
    (["prepare", "--preset", "smoke", "--out", "{tmp}/p", "--workers", "-2"], "--workers must be >= 0"),
    (["eval", "--samples", "{samples}", "--task", "humaneval", "--json", "{tmp}/o.json", "--workers", "-2"],
     "--workers must be >= 0"),
    (["eval", "--samples", "{samples}", "--task", "humaneval", "--json", "{tmp}/o.json", "--attention", "bogus"],
     "--attention must be one of"),
    (["train", "--config", str(SMOKE), "--run-dir", "{tmp}/r", "--tag", "foo"], "--tag takes KEY=VALUE"),
    (["train", "--config", str(SMOKE), "--run-dir", "{tmp}/r", "--parent-run-id", "0123bogus"], "parent run '0123bogus'"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    samples = samples_file(tmp_path)
    argv = [a.format(tmp=tmp_path, samples=samples) for a in argv]
    code, err = run_cli(argv, capsys)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- one line, not a traceback


def test_a_non_utf8_samples_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "S.jsonl"
    bad.write_bytes(b'{"task_id": "HumanEval/0", "completion": "\xff"}\n')
    code, err = run_cli(["eval", "--samples", str(bad), "--task", "humaneval", "--json", str(tmp_path / "o.json")], capsys)
    assert code == 2 and str(bad) in one_line(err) and "utf-8" in one_line(err)


def test_a_lone_surrogate_in_a_completion_keeps_the_evaluation(tmp_path, capsys):
    """It failed after every program had run, losing the evaluation."""
    samples = tmp_path / "S.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    return False  # \\ud800\\n"}\n')
    out = tmp_path / "o.json"
    with pytest.raises(SystemExit) as e:
        bytelm(["eval", "--samples", str(samples), "--task", "humaneval", "--json", str(out), "--timeout", "120"])
    assert e.value.code == 0, capsys.readouterr().err
    results = [json.loads(line) for line in (tmp_path / "o.results.jsonl").read_text().splitlines()]
    assert results[0]["completion"].endswith("\ud800\n") and json.loads(out.read_text())["n_samples"] == 1


def test_a_bogus_parent_run_id_in_report_is_one_line(tmp_path, capsys, monkeypatch):
    from bytelm.tracking import get_or_create_experiment, mlflow_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow_client()
    run = client.create_run(get_or_create_experiment(client, "x"), run_name="a")
    client.set_terminated(run.info.run_id)
    code, err = run_cli(["report", "--experiment", "x", "--out", str(tmp_path / "rep"), "--parent-run-id", "0123bogus"],
                        capsys)
    assert code == 2 and "0123bogus" in one_line(err)
    assert not (tmp_path / "rep").exists()


def test_an_empty_runs_csv_is_one_line(tmp_path, capsys):
    for text in ("", "name,run_id,status,study,vocab,n\n"):
        csv = tmp_path / "runs.csv"
        csv.write_text(text)
        code, err = run_cli(["report", "--runs-csv", str(csv), "--out", str(tmp_path / "rep")], capsys)
        assert code == 2 and str(csv) in one_line(err)


def test_a_bad_config_yaml_in_track_import_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / "run"
    run.mkdir()
    for text in (b"model: [unclosed\n", b"- a list\n", b"model:\n  n_future: \xff\n"):
        (run / "config.yaml").write_bytes(text)
        code, err = run_cli(["track", "import", str(run)], capsys)
        assert code == 2 and "config.yaml" in one_line(err)


def test_eval_on_cuda_without_a_gpu_is_one_line(smoke_run, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    code, err = run_cli(["eval", "--checkpoint", str(smoke_run), "--task", "humaneval", "--device", "cuda",
                         "--json", str(tmp_path / "o.json")], capsys)
    assert code == 2 and "no CUDA GPU" in one_line(err)
