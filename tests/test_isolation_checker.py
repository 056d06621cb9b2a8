"""The isolation checker (:mod:`sqla_tenancy.testing.isolation`): it passes a correct set-up in every
placement, and it catches each mistake planted in the database behind the library's back."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner, Result

from sqla_tenancy import Tenancy, Tenant
from sqla_tenancy.cli import app
from sqla_tenancy.testing import TestServer
from sqla_tenancy.testing.isolation import (
    IsolationError,
    IsolationReport,
    IsolationSetupError,
    assert_tenant_isolation,
    check_tenant_isolation,
)

from .conftest import SECRET
from .models import Project, Task, User


def plant(tenancy: Tenancy, *statements: str) -> None:
    """Run DDL as the admin role (the tables' owner), as a hand-written migration would."""
    with tenancy.admin_engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def ops(report: IsolationReport) -> set[tuple[str, str]]:
    return {(f.model, f.operation) for f in report.findings}


def test_a_correct_setup_passes_in_every_placement(tenancy: Tenancy, tenancy_server: TestServer) -> None:
    tenancy.prepare_server(tenancy_server.superuser_url)
    report = assert_tenant_isolation(tenancy)
    assert report.ok
    assert report.placements == ["shared", "schema", "database"]
    assert set(report.models) == {"projects", "tasks", "auth.users"}
    assert report.checks > 100
    # the checker cleans up after itself: only the default tenant is left
    assert [t.slug for t in tenancy.list_tenants()] == ["default"]


def test_a_table_without_rls_is_caught(tenancy: Tenancy) -> None:
    plant(tenancy, "ALTER TABLE projects DISABLE ROW LEVEL SECURITY")
    report = check_tenant_isolation(tenancy, [Project], placements=["shared"])
    found = ops(report)
    assert {
        ("projects", "see"),
        ("projects", "count"),
        ("projects", "update"),
        ("projects", "delete"),
        ("projects", "insert"),
        ("projects", "rls"),
        ("projects", "no tenant"),
    } <= found
    leak = next(f for f in report.findings if f.operation == "see" and f.via == "orm")
    assert leak.placement == "shared" and leak.leaked_row is not None
    assert leak.leaked_row["name"].startswith("iso-shared-b-")


def test_rls_enabled_but_not_forced_is_caught(tenancy: Tenancy) -> None:
    plant(tenancy, "ALTER TABLE projects NO FORCE ROW LEVEL SECURITY")
    report = check_tenant_isolation(tenancy, [Project], placements=["shared"])
    assert ops(report) == {("projects", "rls")}
    assert "not forced" in report.findings[0].detail


def test_a_permissive_policy_is_caught(tenancy: Tenancy) -> None:
    plant(tenancy, "CREATE POLICY everyone ON projects FOR SELECT USING (true)")
    report = check_tenant_isolation(tenancy, [Project], placements=["shared"])
    assert {("projects", "see"), ("projects", "count"), ("projects", "policy")} <= ops(report)
    assert any("'everyone'" in f.detail for f in report.findings)


def test_a_policy_missing_for_one_command_is_caught(tenancy: Tenancy) -> None:
    plant(tenancy, "DROP POLICY tenancy_update ON projects")
    report = check_tenant_isolation(tenancy, [Project], placements=["shared"])
    assert ops(report) == {("projects", "policy")}
    assert "no tenant policy for UPDATE" in report.findings[0].detail


def test_a_unique_constraint_without_tenant_id_is_caught(tenancy: Tenancy) -> None:
    plant(tenancy, "ALTER TABLE projects ADD CONSTRAINT projects_name_key UNIQUE (name)")
    report = check_tenant_isolation(tenancy, [Project], placements=["shared"])
    assert ops(report) == {("projects", "unique key")}
    finding = report.findings[0]
    assert "projects_name_key" in finding.detail
    assert finding.leaked_row is not None and finding.leaked_row["name"].startswith("iso-shared-b-")


def test_a_foreign_key_without_tenant_id_is_caught(tenancy: Tenancy) -> None:
    with tenancy.admin_engine.connect() as conn:
        (tenant_fk,) = conn.exec_driver_sql(
            "select conname from pg_constraint where conrelid = 'tasks'::regclass and contype = 'f'"
        ).scalars()
    plant(
        tenancy,
        f"ALTER TABLE tasks DROP CONSTRAINT {tenant_fk}",
        "ALTER TABLE tasks ADD CONSTRAINT tasks_project_plain_fkey FOREIGN KEY (project_id) "
        "REFERENCES projects (id)",
    )
    report = check_tenant_isolation(tenancy, [Task], placements=["shared"])
    assert ops(report) == {("tasks", "foreign key")}
    assert "tasks_project_plain_fkey" in report.findings[0].detail


def test_a_grant_to_public_is_caught(tenancy: Tenancy) -> None:
    plant(tenancy, "GRANT SELECT ON projects TO PUBLIC")
    report = check_tenant_isolation(tenancy, [Project], placements=["shared"])
    assert ops(report) == {("projects", "grant")}
    assert "PUBLIC" in report.findings[0].detail


def test_assert_raises_a_specific_error_listing_the_findings(tenancy: Tenancy) -> None:
    plant(tenancy, "ALTER TABLE projects DISABLE ROW LEVEL SECURITY")
    with pytest.raises(IsolationError) as caught:
        assert_tenant_isolation(tenancy, [Project], placements=["shared"])
    message = str(caught.value)
    assert "[shared] projects: see via orm" in message
    assert "leaked row:" in message
    assert not caught.value.report.ok
    assert isinstance(caught.value, AssertionError)


# -- the same mistakes, planted where each placement keeps a tenant's tables ------------------------

PLACEMENTS = ["shared", "schema", "database"]


@pytest.fixture
def pair(
    tenancy: Tenancy, tenancy_server: TestServer, request: pytest.FixtureRequest
) -> tuple[Tenant, Tenant]:
    placement = request.param
    if placement == "database":
        tenancy.prepare_server(tenancy_server.superuser_url)
    return (
        tenancy.create_tenant("acme", placement=placement),
        tenancy.create_tenant("globex", placement=placement),
    )


def plant_at(tenancy: Tenancy, tenant: Tenant, template: str) -> None:
    """Run ``template`` (``{t}``: the tenant's projects table) as the admin role where the tenant's
    tables live: the main database (shared), its schema, or its own database."""
    target = tenancy.placement(tenant.strategy).dump_target(tenant)
    if target is None:
        plant(tenancy, template.format(t="projects"))
        return
    url, schema = target
    engine = create_engine(url.set(drivername="postgresql+psycopg"), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(template.format(t=f'"{schema}".projects'))
    finally:
        engine.dispose()


MISTAKES = {
    "no rls": ("ALTER TABLE {t} DISABLE ROW LEVEL SECURITY", "rls"),
    "rls not forced": ("ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY", "rls"),
    "permissive policy": ("CREATE POLICY everyone ON {t} FOR SELECT USING (true)", "policy"),
    "missing policy": ("DROP POLICY tenancy_delete ON {t}", "policy"),
    "grant to public": ("GRANT SELECT ON {t} TO PUBLIC", "grant"),
}


@pytest.mark.parametrize("pair", PLACEMENTS, indirect=True)
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_is_caught_in_every_placement(
    tenancy: Tenancy, pair: tuple[Tenant, Tenant], mistake: str
) -> None:
    ddl, operation = MISTAKES[mistake]
    for tenant in pair if pair[0].strategy != "shared" else pair[:1]:  # shared: one table for both
        plant_at(tenancy, tenant, ddl)
    report = check_tenant_isolation(tenancy, [Project], tenants=pair)
    assert (pair[0].strategy, "projects", operation) in report.operations(), report.summary()
    assert not report.ok


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_unique_key_of_an_infrastructure_table_is_caught_from_every_placement(
    tenancy: Tenancy, tenancy_server: TestServer, placement: str
) -> None:
    """auth.users is kept once, in the main database, for tenants of every placement (database
    tenants reach it through postgres_fdw): UNIQUE (email) there tells one tenant another's."""
    with tenancy.admin_engine.connect() as conn:
        (key,) = conn.exec_driver_sql(
            "select conname from pg_constraint where conrelid = 'auth.users'::regclass and contype = 'u'"
            " and conname <> 'users_tenant_key'"
        ).scalars()
    plant(
        tenancy,
        f"ALTER TABLE auth.users DROP CONSTRAINT {key}",
        "ALTER TABLE auth.users ADD CONSTRAINT users_email_everywhere UNIQUE (email)",
    )
    if placement == "database":
        tenancy.prepare_server(tenancy_server.superuser_url)
    report = check_tenant_isolation(tenancy, [User], placements=[placement])
    assert report.operations() == {(placement, "auth.users", "unique key")}, report.summary()


# -- the command line -------------------------------------------------------------------------------


@pytest.fixture
def cli_env(tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch) -> Tenancy:
    monkeypatch.setenv("CHECK_TEST_URL", tenancy.url.render_as_string(hide_password=False))
    monkeypatch.setenv("CHECK_TEST_ADMIN_URL", tenancy.admin_url.render_as_string(hide_password=False))
    monkeypatch.setenv("CHECK_TEST_PREFIX", tenancy.name_prefix)
    monkeypatch.setenv("CHECK_TEST_SECRET", SECRET)
    monkeypatch.delenv("SQLA_TENANCY_APP", raising=False)
    return tenancy


def check_cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["check-isolation", "--app", "tests.isolation_app:tenancy", *args])


def test_the_cli_passes_a_correct_setup(cli_env: Tenancy) -> None:
    result = check_cli("--placement", "shared", "--placement", "schema")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


def test_the_cli_reports_findings_as_json_and_exits_1(cli_env: Tenancy) -> None:
    plant(cli_env, "GRANT SELECT ON projects TO PUBLIC")
    result = check_cli("--placement", "shared", "--model", "projects", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["ok"] is False
    assert [(f["model"], f["operation"], f["placement"], f["via"]) for f in report["findings"]] == [
        ("projects", "grant", "shared", "catalog")
    ]


def test_the_cli_refuses_an_unknown_model_or_no_app(cli_env: Tenancy) -> None:
    result = check_cli("--model", "nope")
    assert result.exit_code == 2 and "no table nope" in result.output
    result = CliRunner().invoke(app, ["check-isolation"])
    assert result.exit_code == 2 and "--app" in result.output


# -- the example apps' models -------------------------------------------------------------------------


def test_the_example_apps_models_pass_in_every_placement(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    from examples.common import INFRASTRUCTURE_SCHEMAS, Base

    tenancy = tenancy_factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE_SCHEMAS, secret_key=SECRET)
    tenancy.install()
    tenancy.prepare_server(tenancy_server.superuser_url)
    report = assert_tenant_isolation(tenancy)
    assert set(report.models) == {"projects", "tasks", "auth.users"}
    assert report.placements == ["shared", "schema", "database"]


# -- registered factories ---------------------------------------------------------------------------


def test_registered_factories_supply_the_rows(tenancy: Tenancy) -> None:
    import factory

    from sqla_tenancy.testing.factories import TenantModelFactory

    class ProjectFactory(TenantModelFactory):
        class Meta:
            model = Project

        name = factory.Sequence(lambda n: f"from-factory-boy-{n}")

    emails = itertools.count()
    plant(tenancy, "ALTER TABLE projects DISABLE ROW LEVEL SECURITY")
    report = check_tenant_isolation(
        tenancy,
        [Project, User],
        placements=["shared"],
        factories={
            Project: ProjectFactory,
            "auth.users": lambda: {"email": f"u{next(emails) % 2}@example.com"},
        },
    )
    leak = next(f for f in report.findings if f.operation == "see" and f.via == "core")
    assert leak.leaked_row is not None and leak.leaked_row["name"].startswith("from-factory-boy-")
    # users got the callable's values (the same two addresses in both tenants): no unique-key finding
    assert ("shared", "auth.users", "unique key") not in report.operations()


def test_a_column_the_checker_cannot_fill_asks_for_a_factory(
    tenancy_factory: Callable[..., Tenancy],
) -> None:
    from sqlalchemy import Column, Integer, MetaData, Table
    from sqlalchemy.types import UserDefinedType

    from sqla_tenancy import tenant_id_column

    class Point(UserDefinedType[object]):
        cache_ok = True

        def get_col_spec(self, **kw: object) -> str:
            return "point"

    metadata = MetaData()
    Table(
        "places",
        metadata,
        Column("id", Integer, primary_key=True),
        tenant_id_column(),
        Column("at", Point(), nullable=False),
    )
    tenancy = tenancy_factory(metadata)
    tenancy.install()
    with pytest.raises(IsolationSetupError, match=r"places\.at .*factories="):
        check_tenant_isolation(tenancy, placements=["shared"])
    report = check_tenant_isolation(
        tenancy, placements=["shared"], factories={"places": lambda: {"at": "(1,2)"}}
    )
    assert report.ok, report.summary()
    assert any("no ORM class" in s for s in report.skipped)


def test_the_cli_says_when_a_placement_is_not_available(cli_env: Tenancy) -> None:
    result = check_cli("--placement", "database")  # prepare_server() was never run
    assert result.exit_code == 2, result.output
    assert "could not create a database tenant" in result.output
    assert [t.slug for t in cli_env.list_tenants()] == ["default"]  # nothing left behind
