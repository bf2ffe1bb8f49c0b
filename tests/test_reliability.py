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


@pytest.mark.parametrize("where", ["/proc/bytelm-x/out.json", "under a file"])
def test_an_uncreatable_output_path_is_one_line(tmp_path, capsys, where):
    samples = samples_file(tmp_path)
    if where == "under a file":
        where = str(samples) + "/out.json"
    code, err = run_cli(["eval", "--samples", str(samples), "--task", "humaneval", "--json", where], capsys)
    assert code in (1, 2) and os.path.dirname(where) in one_line(err)
