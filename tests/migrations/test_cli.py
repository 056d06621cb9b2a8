"""The ``sqla-tenancy`` console script: init, and migrate with its summary, report and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import APP, Project

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(sys.executable).parent / "sqla-tenancy")


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_init_creates_a_project_and_never_overwrites(tmp_path: Path) -> None:
    result = cli("init", "db/migrations", "--app", "myapp.db:tenancy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    env = (tmp_path / "db" / "migrations" / "env.py").read_text()
    assert "run_env()" in env and "fileConfig" in env
    assert len(list((tmp_path / "db" / "migrations" / "infrastructure").glob("*_root.py"))) == 1
    assert len(list((tmp_path / "db" / "migrations" / "tenant").glob("*_root.py"))) == 1
    ini = (tmp_path / "alembic.ini").read_text()
    assert "%(here)s/db/migrations/tenant" in ini
    # the app is remembered where env.py and every command find it; the project imports
    assert "[sqla_tenancy]\n" in ini and "\napp = myapp.db:tenancy\n" in ini
    assert "\nprepend_sys_path = %(here)s\n" in ini
    again = cli("init", "db/migrations", "--app", "myapp.db:tenancy", cwd=tmp_path)
    assert again.returncode == 2 and "Not overwriting" in again.stderr


def test_init_needs_the_app(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SQLA_TENANCY_APP"}
    for args, says in (
        ([], "Which application? Pass --app module:attribute"),
        (["--app", "myapp.db"], "is not module:attribute"),
        (["--app", "my app:x"], "is not module:attribute"),
    ):
        result = subprocess.run(
            [SCRIPT, "init", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr)
        assert not (tmp_path / "alembic.ini").exists() and not (tmp_path / "migrations").exists()


def test_migrate_finds_the_app_in_alembic_ini_and_imports_the_project(project: Project) -> None:
    """No --app and no $SQLA_TENANCY_APP: the ini names the app; prepend_sys_path makes the
    project's folder importable (here the tests' root holds the app module)."""
    ini = project.ini.read_text().replace("prepend_sys_path = %(here)s", f"prepend_sys_path = {ROOT}")
    project.ini.write_text(ini)
    env = {k: v for k, v in os.environ.items() if k not in ("SQLA_TENANCY_APP", "PYTHONPATH")}
    result = subprocess.run(
        [SCRIPT, "migrate", "-c", str(project.ini), "--no-progress"],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "infrastructure: upgraded" in result.stderr


def test_migrate_reports_failures_and_exits_non_zero(project: Project, tmp_path: Path) -> None:
    project.schema_fleet_with_a_broken_tenant([f"t{i}" for i in range(4)], "t2")
    report = tmp_path / "report.json"
    result = cli(
        "migrate",
        "--app",
        APP,
        "-c",
        str(project.ini),
        "--jobs",
        "2",
        "--continue-on-error",
        "--report",
        str(report),
        "--no-progress",
    )
    assert result.returncode == 1, result.stderr
    assert "4 upgraded" in result.stderr and "1 failed" in result.stderr  # main + 3 tenants
    assert "t2" in result.stderr and "DuplicateColumn" in result.stderr
    data = json.loads(report.read_text())
    assert data["counts"]["failed"] == 1 and data["jobs"] == 2
    [failed] = [loc for loc in data["locations"] if loc["status"] == "failed"]
    assert failed["location"] == "t2" and failed["before"] == failed["after"]


def test_migrate_exits_3_while_another_run_holds_the_lock(migrated: Project) -> None:
    with migrated.tenancy.admin_engine.connect() as holder:
        holder.exec_driver_sql("select pg_advisory_lock(hashtext('sqla_tenancy:migrate'))")
        holder.commit()
        result = cli("migrate", "--app", APP, "-c", str(migrated.ini), "--no-progress")
    assert result.returncode == 3 and "Another migration run holds the fleet lock" in result.stderr


def test_migrate_needs_an_app(project: Project) -> None:
    """No --app, no $SQLA_TENANCY_APP, and an ini that names none: one line saying where to name it."""
    ini = project.ini.read_text().replace(f"app = {APP}\n", "")
    project.ini.write_text(ini)
    env = {k: v for k, v in os.environ.items() if k != "SQLA_TENANCY_APP"}
    result = subprocess.run(
        [SCRIPT, "migrate", "-c", str(project.ini)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--app module:attribute" in result.stderr
    assert "to the [sqla_tenancy] section of" in result.stderr and "Traceback" not in result.stderr


def test_migrate_refuses_an_unknown_tenant_and_a_missing_config(migrated: Project, tmp_path: Path) -> None:
    unknown = cli("migrate", "--app", APP, "-c", str(migrated.ini), "--tenant", "nobody", "--no-progress")
    assert unknown.returncode == 2 and "nobody" in unknown.stderr and "Traceback" not in unknown.stderr
    missing = cli("migrate", "--app", APP, "-c", str(tmp_path / "nope.ini"), "--no-progress")
    assert missing.returncode == 2 and "No Alembic configuration" in missing.stderr
