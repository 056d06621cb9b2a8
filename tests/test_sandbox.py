"""Tenant-scoped SQL (``Tenancy.run_sql``): a script runs as its tenant, in one transaction, and
cannot reach another tenant, whatever it tries: refused by the text check where it can be seen,
and by the database (its login identity, the state check before commit) where it cannot."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import select, text

from sqla_tenancy import ScriptRefused, Tenancy, UnsupportedOperation, platform_context, tenant_context
from sqla_tenancy.sandbox import check_script, split_statements
from sqla_tenancy.testing import TestServer
from tests.doctor_helpers import own_findings

from .models import Project, User


def seed(t: Tenancy, slug: str) -> None:
    with tenant_context(slug), t.sessionmaker()() as s:
        s.add_all([Project(name=f"{slug}-p"), User(email=f"u@{slug}.test")])
        s.commit()


def names(t: Tenancy, slug: str) -> list[str]:
    with tenant_context(slug), t.sessionmaker()() as s:
        return sorted(s.scalars(select(Project.name)))


def emails(t: Tenancy) -> list[str]:
    with platform_context("test: every user"), t.sessionmaker()() as s:
        return sorted(s.scalars(select(User.email)))


def sandbox_roles(t: Tenancy) -> list[str]:
    with t.admin_engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "select rolname from pg_roles where shobj_description(oid, 'pg_authid') "
                    "like 'sqla-tenancy run_sql sandbox%'"
                )
            ).scalars()
        )


# -- the text check (no database) --------------------------------------------------------------


def test_statements_are_split_outside_literals_and_bodies() -> None:
    script = """
    insert into projects (name) values ('a;b'); -- a comment; with a semicolon
    /* block ; /* nested ; */ */ select $$x;y$$, $tag$ ; $tag$, "odd;name" from projects;
    do $body$ begin perform 1; end $body$;
    """
    statements = split_statements(script)
    assert len(statements) == 3
    assert "do $body$ begin perform 1; end $body$" in statements[2]


@pytest.mark.parametrize(
    "script",
    [
        "SET ROLE postgres",
        "set local role none",
        "SET SESSION AUTHORIZATION postgres",
        "RESET ROLE",
        "reset all",
        "SET search_path = public",
        "SET app.current_tenant_id = '00000000-0000-0000-0000-000000000000'",
        "SET statement_timeout = 0",
        "select set_config('app.current_tenant_id', 'x', false)",
        "SELECT 1; COMMIT; UPDATE projects SET name = 'x'",
        "BEGIN",
        "start transaction",
        "ROLLBACK",
        "end",
        "discard all",
        "ALTER ROLE current_user SET search_path = public",
        "DO $$ BEGIN EXECUTE 'SET ROLE postgres'; END $$",
        "DO $$ BEGIN PERFORM set_config('search_path', 'public', true); END $$",
        "select * from dblink('dbname=postgres', 'select 1') as t(x int)",
        "",
        "  -- only a comment",
    ],
)
def test_the_text_check_refuses_what_would_leave_the_sandbox(script: str) -> None:
    with pytest.raises(ScriptRefused):
        check_script(script)


@pytest.mark.parametrize(
    "script",
    [
        "UPDATE users SET role = 'admin'",  # a column named role is no SET ROLE
        "SAVEPOINT a; DELETE FROM projects; ROLLBACK TO SAVEPOINT a",
        "SET CONSTRAINTS ALL DEFERRED",
        "CREATE TEMP TABLE x (id int) ON COMMIT DROP",
        "SELECT 'it''s; fine'",
    ],
)
def test_the_text_check_lets_ordinary_statements_through(script: str) -> None:
    assert check_script(script)


# -- every placement ---------------------------------------------------------------------------


class SandboxBehaviour:
    placement: str

    @pytest.fixture
    def t(self, tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[Tenancy]:
        if self.placement == "database":
            tenancy.prepare_server(tenancy_server.superuser_url)
        for slug in ("acme", "globex"):
            tenancy.create_tenant(slug, placement=self.placement)
            seed(tenancy, slug)
        yield tenancy

    def test_a_script_runs_as_its_tenant_in_one_transaction(self, t: Tenancy) -> None:
        results = t.run_sql(
            "acme",
            "UPDATE projects SET name = name || '!'; SELECT name FROM projects ORDER BY name; "
            "SELECT count(*) AS users FROM auth.users",
        )
        assert [r.status for r in results] == ["UPDATE 1", "SELECT 1", "SELECT 1"]
        assert results[1].rows == [("acme-p!",)] and results[1].columns == ("name",)
        assert results[2].rows == [(1,)]
        assert names(t, "acme") == ["acme-p!"]
        assert names(t, "globex") == ["globex-p"]
        assert sandbox_roles(t) == []  # a shared or schema tenant's role lasts one run
        assert own_findings(t) == []

    def test_writes_reach_only_its_own_rows(self, t: Tenancy) -> None:
        t.run_sql("acme", "UPDATE auth.users SET email = 'changed'; DELETE FROM projects")
        assert emails(t) == ["changed", "u@globex.test"]
        assert names(t, "globex") == ["globex-p"]

    def test_a_failing_statement_rolls_everything_back(self, t: Tenancy) -> None:
        with pytest.raises(psycopg.errors.UndefinedTable):
            t.run_sql("acme", "DELETE FROM projects; SELECT * FROM no_such_table")
        assert names(t, "acme") == ["acme-p"]
        assert sandbox_roles(t) == []

    def test_the_statement_timeout_holds(self, t: Tenancy) -> None:
        with pytest.raises(psycopg.errors.QueryCanceled):
            t.run_sql("acme", "DELETE FROM projects; SELECT pg_sleep(5)", timeout=0.3)
        assert names(t, "acme") == ["acme-p"]

    def test_a_refused_script_runs_nothing(self, t: Tenancy) -> None:
        with pytest.raises(ScriptRefused, match="Statement 2"):
            t.run_sql("acme", "DELETE FROM projects; SET ROLE NONE; DELETE FROM projects")
        assert names(t, "acme") == ["acme-p"]

    def test_dynamic_sql_that_rebinds_the_tenant_stays_in_the_tenant(self, t: Tenancy) -> None:
        globex = t.get_tenant("globex")
        # past the text check: the setting's name is assembled at run time
        script = (
            "DO $$ BEGIN EXECUTE 'SELECT set_' || 'config(''app.current_' || 'tenant_id'', "
            f"''{globex.id}'', true)'; END $$; "
            "UPDATE auth.users SET email = 'pwned'"
        )
        with pytest.raises(ScriptRefused, match="rolled back"):
            t.run_sql("acme", script)
        assert emails(t) == ["u@acme.test", "u@globex.test"]

    def test_dynamic_sql_that_changes_role_and_back_cannot_reach_another_tenant(self, t: Tenancy) -> None:
        # whatever the session switches to and back, it can only become what its login may
        target = t.get_tenant("globex").location.get("role") or t.config.app_role
        script = (
            f"DO $$ BEGIN EXECUTE 'SE' || 'T ROLE ' || quote_ident('{target}'); "
            "EXECUTE 'UPDATE auth.users SET email = ''pwned'''; "
            "EXECUTE 'RES' || 'ET ROLE'; END $$"
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            t.run_sql("acme", script)
        assert emails(t) == ["u@acme.test", "u@globex.test"]

    def test_dynamic_sql_that_moves_the_search_path_is_rolled_back(self, t: Tenancy) -> None:
        script = (
            "DELETE FROM projects; "
            "DO $$ BEGIN EXECUTE 'SELECT set_' || 'config(''search_' || 'path'', ''public'', true)'; END $$"
        )
        with pytest.raises(ScriptRefused, match="search_path"):
            t.run_sql("acme", script)
        assert names(t, "acme") == ["acme-p"]

    def test_a_suspended_tenant_runs_no_script(self, t: Tenancy) -> None:
        t.suspend_tenant("acme")
        with pytest.raises(UnsupportedOperation, match="suspended"):
            t.run_sql("acme", "SELECT 1")


class TestSharedSandbox(SandboxBehaviour):
    placement = "shared"

    def test_the_shared_tables_show_only_its_rows(self, t: Tenancy) -> None:
        (result,) = t.run_sql("acme", "SELECT name FROM projects")
        assert result.rows == [("acme-p",)]


class TestSchemaSandbox(SandboxBehaviour):
    placement = "schema"

    def test_another_schema_is_out_of_reach(self, t: Tenancy) -> None:
        other = t.get_tenant("globex").location["schema"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            t.run_sql("acme", f'SELECT * FROM "{other}".projects')
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            t.run_sql("acme", "SELECT * FROM public.projects")


class TestDatabaseSandbox(SandboxBehaviour):
    placement = "database"

    def test_no_other_database_is_reachable(self, t: Tenancy) -> None:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            t.run_sql("acme", "SELECT * FROM tenancy.tenants_of_everyone()")
        (result,) = t.run_sql("acme", "SELECT current_database()")
        assert result.rows == [(t.get_tenant("acme").location["database"],)]
