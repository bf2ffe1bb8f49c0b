"""Shared test fixtures.

`mlflow_store`: the URI of an empty MLflow SQLite store at tmp_path/mlflow.db, a copy of
`empty_mlflow_db`, made once per session (MLflow's schema migrations take seconds of CPU
per fresh store).

`smoke_data`: the smoke corpus (`bytelm prepare --preset smoke`: 4 MB of the standard
library, bytes and a 2,048-token BPE), built once per test session. Under pytest-xdist
every worker asks for it; the first builds it into a folder shared by the session's
workers while holding a file lock, the others wait and then find it up to date.

    def test_something(smoke_data):
        ds = ShardDataset(smoke_data / "bytes" / "train")
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def _session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by all xdist workers of this session (and by no other session)."""
    base = tmp_path_factory.getbasetemp()
    # xdist workers get basetemp = <session>/popen-gwN; a plain run gets <session> itself.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.prepare import prepare, preset_options

    root = _session_dir(tmp_path_factory)
    out = root / "smoke_data"
    with FileLock(str(root / "smoke_data.lock")):
        # Idempotent: the second worker's call finds every stage up to date in ~0.1 s.
        prepare(preset_options("smoke", out, workers=1))
    return out


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bytelm.tracking import mlflow_client

    root = _session_dir(tmp_path_factory)
    db = root / "empty_mlflow" / "mlflow.db"
    with FileLock(str(root / "empty_mlflow.lock")):
        if not db.is_file():
            mlflow_client(f"sqlite:///{db}")  # makes the tables
    return db


@pytest.fixture
def mlflow_store(tmp_path: Path, empty_mlflow_db: Path) -> str:
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real one-node Slurm cluster (scripts/slurm_cluster.sh) for this test worker: the
    path of its slurm.conf, to pass as SLURM_CONF. Skipped, with the reason, where Slurm is
    not installed or this is not root; in CI (CI=true) that is a failure instead."""
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(t) is None]
    why = (f"Slurm is not installed ({', '.join(missing)} missing: Debian's slurm-wlm and munge)" if missing
           else "the test cluster needs root" if os.geteuid() != 0 else None)
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; scripts/test.sh installs them in CI")
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("slurm")
    script = REPO / "scripts" / "slurm_cluster.sh"
    r = subprocess.run(["bash", str(script), "start", str(folder)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"the test Slurm cluster did not start: {r.stdout}{r.stderr}")
    yield folder / "slurm.conf"
    subprocess.run(["bash", str(script), "stop", str(folder)], capture_output=True, timeout=120)
