"""Shared test fixtures.

`smoke_data`: the smoke corpus (`bytelm prepare --preset smoke`: 4 MB of the standard
library, bytes and a 2,048-token BPE), built once per test session. Under pytest-xdist
every worker asks for it; the first builds it into a folder shared by the session's
workers while holding a file lock, the others wait and then find it up to date.

    def test_something(smoke_data):
        ds = ShardDataset(smoke_data / "bytes" / "train")
"""

from __future__ import annotations

import os
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
