"""The layout is the architecture (issue 20): subpackages by concern, each saying what it may
import; `lint-imports` (pyproject.toml's contracts) enforces the picture; modules stay small."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import worker

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(worker.__file__).parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 450
SUPERVISOR_MAX = 350


def subpackages() -> list[str]:
    return sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return found


def test_every_subpackage_says_its_job_and_what_it_may_import() -> None:
    assert len(subpackages()) >= 6
    for name in subpackages():
        doc = (PACKAGE / name / "__init__.py").read_text()
        assert doc.startswith('"""') and "May import" in doc, f"worker/{name}/__init__.py"


def test_the_layers_contract_covers_every_subpackage() -> None:
    (layers,) = [c for c in contracts() if c["type"] == "layers"]
    named = {part.strip() for layer in layers["layers"] for part in str(layer).split("|")}  # type: ignore[attr-defined]
    assert {f"worker.{name}" for name in subpackages()} <= named
    assert {"worker.cli", "worker.rules"} <= named


def test_no_module_is_over_the_limit() -> None:
    sizes = {p.relative_to(PACKAGE): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {str(p): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
    assert sizes[Path("service/supervisor.py")] < SUPERVISOR_MAX


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in result.stdout


def test_a_pure_rule_importing_the_api_client_breaks_the_contracts(tmp_path: Path) -> None:
    """The deliberate violation: ``worker.rules.decisions`` imports ``worker.prefect.api``."""
    shutil.copytree(PACKAGE, tmp_path / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    decisions = tmp_path / "worker" / "rules" / "decisions.py"
    decisions.write_text(decisions.read_text() + "\nfrom worker.prefect import api as _api  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "Pure rules do no I/O" in result.stdout and "BROKEN" in result.stdout
    assert "worker.rules.decisions -> worker.prefect.api" in result.stdout, result.stdout
