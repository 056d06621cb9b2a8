"""``sqla-tenancy tenants|shell|run`` as a user runs them: the console script in a subprocess, its
output, its ``--json`` and its exit codes (0 done, 1 failed, 2 usage, 4 not confirmed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from alembic_ext.versions import TENANT

from .conftest import APP, Project

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(sys.executable).parent / "sqla-tenancy")
TENANT_KEYS = {
    "id",
    "slug",
    "name",
    "placement",
    "status",
    "is_default",
    "created_at",
    "revision",
    "location",
}


def cli(
    project: Project, *args: str, stdin: str | None = None, path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (ROOT, path) if p), "COLUMNS": "200"}
    env.pop("SQLA_TENANCY_APP", None)
    return subprocess.run(
        [SCRIPT, *args, "--app", APP, "-c", str(project.ini)] if "--" not in args else [SCRIPT, *args],
        cwd=project.root,
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_tenants_commands(migrated: Project, tmp_path: Path) -> None:
    head = migrated.heads(TENANT)[0]
    created = ok_json(
        cli(migrated, "tenants", "create", "acme", "--placement", "schema", "--name", "Acme", "--json")
    )
    assert isinstance(created, dict) and set(created) == TENANT_KEYS
    assert (created["slug"], created["placement"], created["status"], created["name"]) == (
        "acme",
        "schema",
        "active",
        "Acme",
    )
    assert created["revision"] == head  # what create_tenant returns is what the registry holds
    uuid.UUID(created["id"])
    plain = cli(migrated, "tenants", "create", "globex")
    assert (plain.returncode, plain.stdout.strip()) == (0, "created tenant 'globex' (shared, active)")

    again = cli(migrated, "tenants", "create", "acme")
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "exists already" in again.stderr
    bad = cli(migrated, "tenants", "create", "Not A Slug")
    assert bad.returncode == 2 and "error: " in bad.stderr and "Traceback" not in bad.stderr
    unknown_placement = cli(migrated, "tenants", "create", "x1", "--placement", "cloud")
    assert unknown_placement.returncode == 2 and "--placement must be one of" in unknown_placement.stderr
    usage = cli(migrated, "tenants", "list", "--no-such-option")
    assert usage.returncode == 2

    listed = ok_json(cli(migrated, "tenants", "list", "--json"))
    assert isinstance(listed, list) and [t["slug"] for t in listed] == ["default", "acme", "globex"]
    assert all(set(t) == TENANT_KEYS for t in listed)
    assert [
        t["slug"] for t in ok_json(cli(migrated, "tenants", "list", "--placement", "schema", "--json"))
    ] == [  # type: ignore[union-attr]
        "acme"
    ]
    assert ok_json(cli(migrated, "tenants", "list", "--behind", "--json")) == []
    table = cli(migrated, "tenants", "list")
    assert table.returncode == 0 and "acme" in table.stdout and "schema" in table.stdout

    shown = ok_json(cli(migrated, "tenants", "show", "acme", "--json"))
    assert isinstance(shown, dict) and shown["location"]["schema"].endswith("acme")
    missing = cli(migrated, "tenants", "show", "nobody")
    assert missing.returncode == 1 and "No tenant 'nobody'" in missing.stderr

    odd = cli(migrated, "tenants", "update", "globex", "--name", "[/] not [bold]markup")
    assert odd.returncode == 0, odd.stderr
    shown_as_is = cli(migrated, "tenants", "list")
    assert shown_as_is.returncode == 0 and "[/] not [bold]markup" in shown_as_is.stdout, shown_as_is.stderr
    renamed = ok_json(cli(migrated, "tenants", "update", "acme", "--name", "Acme Inc", "--json"))
    assert isinstance(renamed, dict) and renamed["name"] == "Acme Inc"
    suspended = ok_json(cli(migrated, "tenants", "suspend", "acme", "--json"))
    assert isinstance(suspended, dict) and suspended["status"] == "suspended"
    default = cli(migrated, "tenants", "suspend", "default")
    assert default.returncode == 1 and "default tenant" in default.stderr
    resumed = cli(migrated, "tenants", "resume", "acme")
    assert (resumed.returncode, resumed.stdout.strip()) == (0, "resumed tenant 'acme' (schema, active)")

    refused = cli(migrated, "tenants", "rotate-key", "acme")  # no terminal, no --yes
    assert refused.returncode == 4 and "pass --yes" in refused.stderr
    rotated = ok_json(cli(migrated, "tenants", "rotate-key", "acme", "--yes", "--json"))
    assert isinstance(rotated, dict) and uuid.UUID(rotated["access_key"])

    dump = tmp_path / "acme.sql"
    exported = ok_json(cli(migrated, "tenants", "export", "acme", "--output", str(dump), "--json"))
    assert isinstance(exported, dict) and exported["bytes"] == dump.stat().st_size > 0

    not_confirmed = cli(migrated, "tenants", "delete", "globex")
    assert not_confirmed.returncode == 4
    assert migrated.tenancy.get_tenant("globex").is_active  # nothing was changed
    deleted = ok_json(cli(migrated, "tenants", "delete", "globex", "--yes", "--json"))
    assert isinstance(deleted, dict) and deleted["deleted"]["slug"] == "globex"
    assert [t.slug for t in migrated.tenancy.list_tenants()] == ["default", "acme"]

    not_asked = cli(migrated, "tenants", "move", "acme", "--to", "shared")
    assert not_asked.returncode == 4 and migrated.tenancy.get_tenant("acme").placement == "schema"
    moved = ok_json(cli(migrated, "tenants", "move", "acme", "--to", "shared", "--yes", "--json"))
    assert isinstance(moved, dict) and (moved["slug"], moved["placement"]) == ("acme", "shared")
    nowhere = cli(migrated, "tenants", "move", "acme", "--to", "cloud", "--yes")
    assert nowhere.returncode == 2 and "--to must be one of" in nowhere.stderr
    assert ok_json(cli(migrated, "tenants", "pool", "--json")) == {"added": 0, "target": None, "pending": []}
    no_size = cli(migrated, "tenants", "pool", "--refill")
    assert no_size.returncode == 2 and "pending_tenants={'database': N}" in no_size.stderr
    both = cli(migrated, "tenants", "pool", "--refill", "--fill", "2")
    assert both.returncode == 2 and "not both" in both.stderr


def test_tenants_list_behind(migrated: Project) -> None:
    migrated.tenancy.create_tenant("acme", placement="schema")
    revision = migrated.add_revision(TENANT, "pass")
    behind = ok_json(cli(migrated, "tenants", "list", "--behind", "--json"))
    assert isinstance(behind, list) and {t["slug"] for t in behind} == {"default", "acme"}
    assert all(t["at_head"] is False and t["revision"] != revision for t in behind)
    assert cli(migrated, "migrate", "--no-progress").returncode == 0
    assert ok_json(cli(migrated, "tenants", "list", "--behind", "--json")) == []


def test_shell_runs_as_the_tenant_or_as_the_platform(migrated: Project) -> None:
    migrated.tenancy.create_tenant("acme", placement="schema")
    migrated.tenancy.create_tenant("globex")
    with_rows = "session.add(Project(name='mine')); session.commit()\n"
    as_acme = cli(
        migrated,
        "shell",
        "--tenant",
        "acme",
        stdin=with_rows + "print('seen', [p.name for p in session.scalars(select(Project))], tenant.slug)\n",
    )
    assert as_acme.returncode == 0, as_acme.stderr
    assert "seen ['mine'] acme" in as_acme.stdout
    assert "[acme] >>> " in as_acme.stderr + as_acme.stdout  # the prompt shows the tenant
    as_globex = cli(
        migrated,
        "shell",
        "--tenant",
        "globex",
        stdin="print('seen', session.scalars(select(Project)).all())\n",
    )
    assert "seen []" in as_globex.stdout
    platform = cli(
        migrated,
        "shell",
        "--platform",
        "support ticket 42",
        stdin="print('rows', session.scalar(select(func.count()).select_from(Project)))\n",
    )
    assert platform.returncode == 0 and "rows 0" in platform.stdout  # acme's row is in its schema
    neither = cli(migrated, "shell")
    assert neither.returncode == 2 and "exactly one of --tenant" in neither.stderr
    migrated.tenancy.suspend_tenant("acme")
    suspended = cli(migrated, "shell", "--tenant", "acme", stdin="")
    assert suspended.returncode == 1 and "suspended" in suspended.stderr


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    folder = tmp_path / "userjobs"
    folder.mkdir()
    (folder / "jobs_for_test.py").write_text(
        "from sqlalchemy import func, select\n"
        "from tests.migrations.app import tenancy as make\n"
        "from tests.models import Project\n"
        "tenancy = make()\n"
        "Session = tenancy.sessionmaker()\n"
        "def add(tenant):\n"
        "    with Session() as s:\n"
        "        s.add(Project(name=tenant.slug)); s.commit()\n"
        "def names():\n"
        "    with Session() as s:\n"
        "        return sorted(s.scalars(select(Project.name)))\n"
        "def fail_for_acme(tenant):\n"
        "    if tenant.slug == 'acme':\n"
        "        raise RuntimeError('acme is broken')\n"
    )
    (folder / "script_for_test.py").write_text(
        "import sys\n"
        "import jobs_for_test  # the app's Tenancy, as a real script imports it\n"
        "from sqla_tenancy import current_tenant\n"
        "print('as', current_tenant().slug, sys.argv[1:])\n"
        "sys.exit(3 if current_tenant().slug == 'globex' else 0)\n"
    )
    return folder


def test_run_a_function_per_tenant(migrated: Project, jobs: Path) -> None:
    for slug, placement in (("acme", "schema"), ("globex", "shared"), ("initech", "shared")):
        migrated.tenancy.create_tenant(slug, placement=placement)
    added = ok_json(
        cli(
            migrated,
            "run",
            "--all-tenants",
            "--exclude-default",
            "--jobs",
            "2",
            "--json",
            "jobs_for_test:add",
            path=jobs,
        )
    )
    assert isinstance(added, dict) and added["ok"] is True
    assert {o["tenant"]: o["status"] for o in added["tenants"]} == {
        "acme": "ok",
        "globex": "ok",
        "initech": "ok",
    }
    names = ok_json(cli(migrated, "run", "-t", "acme,globex", "--json", "jobs_for_test:names", path=jobs))
    assert isinstance(names, dict)
    assert {o["tenant"]: o["result"] for o in names["tenants"]} == {
        "acme": "['acme']",
        "globex": "['globex']",
    }
    only_schema = ok_json(
        cli(
            migrated,
            "run",
            "--all-tenants",
            "--placement",
            "schema",
            "--json",
            "jobs_for_test:names",
            path=jobs,
        )
    )
    assert isinstance(only_schema, dict) and [o["tenant"] for o in only_schema["tenants"]] == ["acme"]

    stopped = cli(
        migrated, "run", "-t", "acme", "-t", "globex", "--json", "jobs_for_test:fail_for_acme", path=jobs
    )
    assert stopped.returncode == 1
    outcome = {o["tenant"]: (o["status"], o["error"]) for o in json.loads(stopped.stdout)["tenants"]}
    assert outcome == {"acme": ("failed", "RuntimeError: acme is broken"), "globex": ("not run", None)}
    went_on = cli(
        migrated, "run", "-t", "acme,globex", "--continue-on-error", "jobs_for_test:fail_for_acme", path=jobs
    )
    assert went_on.returncode == 1 and "1 ok, 1 failed, 0 not run" in went_on.stdout

    for args, says in (
        (["jobs_for_test:add"], "--tenant SLUG (repeatable) or --all-tenants"),
        (["--all-tenants"], "what to run?"),
        (["-t", "acme", "--placement", "schema", "jobs_for_test:add"], "--placement narrows --all-tenants"),
        (["-t", "acme", "no_such_module:f"], "cannot import 'no_such_module'"),
    ):
        result = cli(migrated, "run", *args, path=jobs)
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr)
    unknown = cli(migrated, "run", "-t", "nobody", "jobs_for_test:add", path=jobs)
    assert unknown.returncode == 1 and "No tenant 'nobody'" in unknown.stderr


def test_run_a_script_per_tenant(migrated: Project, jobs: Path) -> None:
    migrated.tenancy.create_tenant("acme", placement="schema")
    migrated.tenancy.create_tenant("globex")
    env_args = ["--app", APP, "-c", str(migrated.ini)]
    result = cli(
        migrated,
        "run",
        "-t",
        "acme,globex",
        "--continue-on-error",
        "--json",
        *env_args,
        "--",
        "python",
        str(jobs / "script_for_test.py"),
        "--dry-run",
        path=jobs,
    )
    assert result.returncode == 1, result.stderr
    assert (
        "[acme] as acme ['--dry-run']" in result.stderr
        and "[globex] as globex ['--dry-run']" in result.stderr
    )
    outcome = {o["tenant"]: (o["status"], o["exit_code"]) for o in json.loads(result.stdout)["tenants"]}
    assert outcome == {"acme": ("ok", 0), "globex": ("failed", 3)}
    shell = cli(
        migrated,
        "run",
        "-t",
        "acme",
        *env_args,
        "--",
        "sh",
        "-c",
        'echo "tenant=$SQLA_TENANCY_TENANT"',
        path=jobs,
    )
    assert shell.returncode == 0 and "[acme] tenant=acme" in shell.stderr
