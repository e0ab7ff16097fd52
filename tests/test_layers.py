"""The floor plan: imports point down only (import-linter's layers contract in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
PACKAGES = ("kedit", "editing", "evaluation", "flows")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter not installed (install the dev extra)")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    # run from the tree's root so that its packages, not the installed ones, are analysed
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tree), "HOME": str(tree)}
    return subprocess.run([LINT, "--no-cache"], cwd=tree, capture_output=True, text=True, env=env)


def _copy_tree(dst: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_floors_contract_is_kept(tmp_path):
    proc = _lint(_copy_tree(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "floors: imports point down KEPT" in proc.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("kedit/core/_upward.py", "from kedit.store import tracking"),  # foundation -> store
        ("editing/_upward.py", "from evaluation import metrics"),  # side by side: editors never import metrics
        ("kedit/pipeline/_upward.py", "import flows.stream"),  # pipeline -> flows
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    tree = _copy_tree(tmp_path)
    (tree / module).write_text(upward + "\n")
    proc = _lint(tree)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout
    assert module.removesuffix(".py").replace("/", ".") in proc.stdout
