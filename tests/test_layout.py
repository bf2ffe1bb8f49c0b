"""Imports run one way (docs/architecture.md): `data_prep` and `analysis` build on
`bytelm`, and `bytelm` never imports them, nor `experiments` (YAML only) or the
measurement scripts of `benchmarks/`. Its CLI is the one exception: it dispatches
commands to the other folders, lazily."""

from __future__ import annotations

import ast
from pathlib import Path

from bytelm.paths import REPO_ROOT

APPLICATION = {"data_prep", "analysis", "experiments", "benchmarks"}
DISPATCHER = REPO_ROOT / "bytelm" / "cli.py"


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            # importlib.import_module("data_prep.x") with a literal name
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def test_the_library_imports_no_application_folder():
    modules = sorted(p for p in (REPO_ROOT / "bytelm").rglob("*.py") if p != DISPATCHER)
    assert len(modules) > 10  # the walk found the package
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(imported_packages(p) & APPLICATION) for p in modules}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scan_sees_every_kind_of_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n"
                 "def f():\n    from data_prep.polynomials import END\n"
                 "class C:\n    import analysis.report as r\n"
                 "importlib.import_module('experiments.sweep')\n"
                 "from . import sibling\n")
    assert imported_packages(f) == {"os", "data_prep", "analysis", "experiments"}


def test_the_dispatcher_imports_the_other_folders_only_lazily():
    tree = ast.parse(DISPATCHER.read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & APPLICATION


def test_experiments_holds_configs_not_code():
    code = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "experiments").rglob("*.py"))
    assert code == []
    assert list((REPO_ROOT / "experiments").rglob("*.yaml"))
