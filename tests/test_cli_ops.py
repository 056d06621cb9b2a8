"""``sqla-tenancy doctor``, ``sql``, ``audit``, ``tenants move``: thin mappings onto the API, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, text

from sqla_tenancy import Tenancy, platform_context, tenant_context
from sqla_tenancy.cli.ops import parse_since
from sqla_tenancy.testing import TestServer

from .conftest import SECRET
from .models import Project

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(sys.executable).parent / "sqla-tenancy")


@pytest.fixture
def cli(tenancy: Tenancy) -> object:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "200",
        "SQLA_TENANCY_APP": "tests.ops_app:tenancy",
        "OPS_TEST_URL": tenancy.url.render_as_string(hide_password=False),
        "OPS_TEST_ADMIN_URL": tenancy.admin_url.render_as_string(hide_password=False),
        "OPS_TEST_PREFIX": tenancy.name_prefix,
        "OPS_TEST_SECRET": SECRET,
    }

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SCRIPT, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=120
        )

    return run


def test_doctor_exits_zero_when_clean_and_one_on_an_error(tenancy: Tenancy, cli: object) -> None:
    result = cli("doctor")  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    assert "no findings" in result.stdout
    with tenancy.admin_engine.begin() as conn:
        conn.execute(text("ALTER TABLE projects NO FORCE ROW LEVEL SECURITY"))
    result = cli("doctor", "--json")  # type: ignore[operator]
    assert result.returncode == 1
    (finding,) = json.loads(result.stdout)
    assert finding["check"] == "rls-not-forced" and finding["severity"] == "error"
    assert finding["fix"] == "ALTER TABLE projects FORCE ROW LEVEL SECURITY"


def test_sql_runs_a_script_as_the_tenant(tenancy: Tenancy, cli: object, tmp_path: Path) -> None:
    tenancy.create_tenant("acme", placement="schema")
    script = tmp_path / "fix.sql"
    script.write_text("INSERT INTO projects (name) VALUES ('from a script');\nSELECT name FROM projects;\n")
    result = cli("sql", "--tenant", "acme", "-f", str(script))  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["INSERT 0 1", "name", "from a script", "SELECT 1"]
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        assert s.scalars(select(Project.name)).all() == ["from a script"]


def test_sql_refuses_an_escape_and_commits_nothing(tenancy: Tenancy, cli: object) -> None:
    tenancy.create_tenant("acme")
    result = cli("sql", "-t", "acme", "-f", "-", stdin="DELETE FROM projects; RESET ROLE;")  # type: ignore[operator]
    assert result.returncode == 1
    assert "Statement 2" in result.stderr and "resets" in result.stderr


def test_sql_reports_a_failing_statement(tenancy: Tenancy, cli: object) -> None:
    tenancy.create_tenant("acme")
    result = cli("sql", "-t", "acme", "-f", "-", stdin="SELECT * FROM nowhere")  # type: ignore[operator]
    assert result.returncode == 1
    assert "UndefinedTable" in result.stderr and "rolled back" in result.stderr


def test_audit_lists_a_tenants_platform_writes(tenancy: Tenancy, cli: object) -> None:
    tenancy.create_tenant("acme")
    tenancy.install_audit()
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        s.add(Project(name="p"))
        s.commit()
    with platform_context("support ticket 7"), tenancy.admin_engine.begin() as conn:
        conn.execute(text("update projects set name = 'q'"))
    result = cli("audit", "--tenant", "acme", "--since", "1h", "--json")  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)
    assert (entry["tenant"], entry["operation"], entry["rows"], entry["reason"]) == (
        "acme",
        "UPDATE",
        1,
        "support ticket 7",
    )
    text_result = cli("audit", "-t", "acme")  # type: ignore[operator]
    assert "support ticket 7" in text_result.stdout and "public.projects" in text_result.stdout


def test_since_takes_times_and_durations() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    assert parse_since("2h", now=now) == now - timedelta(hours=2)
    assert parse_since("7d", now=now) == now - timedelta(days=7)
    assert parse_since("2026-11-30") == datetime(2026, 11, 30, tzinfo=timezone.utc)
    with pytest.raises(Exception, match="neither an ISO"):
        parse_since("yesterday")


def test_tenants_move_to_a_database_and_back(
    tenancy: Tenancy, cli: object, tenancy_server: TestServer
) -> None:
    tenancy.prepare_server(tenancy_server.superuser_url)
    tenancy.create_tenant("acme")
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        s.add(Project(name="kept"))
        s.commit()
    result = cli("tenants", "move", "acme", "--to", "database", "--yes", "--json")  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["placement"] == "database"
    result = cli("tenants", "move", "acme", "--to", "shared", "--yes")  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        assert s.scalars(select(Project.name)).all() == ["kept"]
    result = cli("tenants", "move", "acme", "--to", "schema", "--server", "eu", "--yes")  # type: ignore[operator]
    assert result.returncode != 0 and "server= applies to moves to the database placement" in result.stderr
