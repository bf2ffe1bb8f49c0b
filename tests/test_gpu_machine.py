"""scripts/gpu_machine.sh, the helper for a bare GPU machine, run with this Python (which
has torch and every dependency, so nothing is installed): it runs this checkout's
bytelm, passes the command's exit status through, and packs run folders without their
checkpoints whatever that status."""
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def helper(tmp_path, *args):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_SITE": str(tmp_path / "site"),
           "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_machine.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_runs_bytelm_and_packs_without_checkpoints(tmp_path):
    run = tmp_path / "runs" / "s"
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    (run / "checkpoints" / "step_0000001" / "model.safetensors").write_bytes(b"x" * 100)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    out = tmp_path / "out"
    r = helper(tmp_path, "--time-limit", "60", "--out", str(out), "--pack", str(run), "--",
               "bytelm", "sweep", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: bytelm sweep" in r.stdout
    names = tarfile.open(out / "s.tgz").getnames()
    assert any(n.endswith("runs/s/metrics.jsonl") for n in names)
    assert not any("checkpoints" in n for n in names)


def test_a_failed_command_is_still_packed_and_its_status_returned(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "status.json").write_text("{}")
    r = helper(tmp_path, "--out", str(tmp_path / "out"), "--pack", str(run), "--", "sh", "-c", "exit 3")
    assert r.returncode == 3
    assert (tmp_path / "out" / "r.tgz").is_file()


def test_the_time_limit_stops_the_command(tmp_path):
    r = helper(tmp_path, "--time-limit", "1", "--out", str(tmp_path / "out"), "--", "sleep", "30")
    assert r.returncode == 124 and "time limit" in r.stderr


@pytest.mark.parametrize("args", [["--time-limit", "soon", "--", "true"], ["--pack"], [], ["--bogus", "--", "true"]])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, args):
    r = helper(tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
