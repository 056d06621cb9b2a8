"""The layers of docs/architecture.md hold: import-linter's contract (pyproject.toml) is kept, and
it is not a contract that cannot fail: an import planted upwards breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_layers_contract_is_kept() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sqla-tenancy layers KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "edge"),
    [
        ("errors.py", "from . import tenancy", "sqla_tenancy.errors -> sqla_tenancy.tenancy"),
        (
            "placements/shared.py",
            "from .. import lifecycle",
            "sqla_tenancy.placements.shared -> sqla_tenancy.lifecycle",
        ),
        ("tenancy.py", "import alembic_ext", "sqla_tenancy.tenancy -> alembic_ext"),
    ],
)
def test_an_import_planted_upwards_breaks_the_contract(
    tmp_path: Path, module: str, planted: str, edge: str
) -> None:
    for package in ("sqla_tenancy", "alembic_ext"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "sqla_tenancy" / module).open("a") as f:
        f.write(f"\n{planted}  # planted back-edge\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "sqla-tenancy layers BROKEN" in result.stdout
    assert edge in result.stdout
