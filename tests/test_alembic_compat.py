"""Each undocumented part of Alembic that sqla-tenancy relies on (``sqla_tenancy.alembic_compat``)
still exists and behaves as it is used, on the installed Alembic."""

from __future__ import annotations

from pathlib import Path

import alembic
import pytest
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from packaging.specifiers import SpecifierSet

from sqla_tenancy import alembic_compat


@pytest.fixture
def script(tmp_path: Path) -> ScriptDirectory:
    """Two revisions in a row: a (base) -> b."""
    versions = tmp_path / "versions"
    versions.mkdir()
    for rev, down in (("a", None), ("b", "a")):
        (versions / f"{rev}.py").write_text(
            f"revision = {rev!r}\ndown_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n"
            "def upgrade(): pass\ndef downgrade(): pass\n"
        )
    (tmp_path / "script.py.mako").write_text("")
    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    return ScriptDirectory.from_config(config)


def test_the_installed_alembic_is_a_checked_one() -> None:
    assert alembic.__version__ in SpecifierSet(alembic_compat.KNOWN_ALEMBIC)


def test_upgrade_steps(script: ScriptDirectory) -> None:
    steps = alembic_compat.upgrade_steps(script, "heads", ())
    assert [s.to_revisions for s in steps] == [("a",), ("b",)] and not steps[0].is_downgrade
    assert alembic_compat.upgrade_steps(script, "heads", ("b",)) == []


def test_downgrade_steps(script: ScriptDirectory) -> None:
    steps = alembic_compat.downgrade_steps(script, "base", ("b",))
    assert [s.to_revisions for s in steps] == [("a",), ()] and steps[0].is_downgrade


def test_stamp_steps(script: ScriptDirectory) -> None:
    steps = alembic_compat.stamp_steps(script, ("b",), ())
    assert len(steps) == 1 and steps[0].to_revisions == ("b",)


def test_version_directories(script: ScriptDirectory, tmp_path: Path) -> None:
    assert [Path(d).resolve() for d in alembic_compat.version_directories(script)] == [
        (tmp_path / "versions").resolve()
    ]


def test_running_environment(script: ScriptDirectory) -> None:
    assert alembic_compat.running_environment() is None
    config = Config()
    config.set_main_option("script_location", script.dir)
    with EnvironmentContext(config, script) as env:
        assert alembic_compat.running_environment() is env
