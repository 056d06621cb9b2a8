"""The isolation doctor: a clean install reports nothing; each misconfiguration, planted one at a
time, is reported with its severity and its fix."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sqla_tenancy import Tenancy
from sqla_tenancy.doctor import Finding, findings_json
from sqla_tenancy.rls import fdw_role_name
from sqla_tenancy.testing import TestServer
from tests.doctor_helpers import own_findings


def admin_sql(t: Tenancy, *statements: str) -> None:
    with t.admin_engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def superuser_sql(server: TestServer, database: str, *statements: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(server.superuser_url.set(database=database), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def only(findings: list[Finding], check: str) -> Finding:
    matching = [f for f in findings if f.check == check]
    assert len(matching) == 1, findings
    others = [f for f in findings if f.check != check]
    assert others == [], others
    return matching[0]


@pytest.fixture
def fleet(tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[Tenancy]:
    """One tenant of each placement on a clean install."""
    tenancy.prepare_server(tenancy_server.superuser_url)
    tenancy.create_tenant("acme")
    tenancy.create_tenant("globex", placement="schema")
    tenancy.create_tenant("initech", placement="database")
    yield tenancy


def test_a_clean_install_reports_nothing(fleet: Tenancy) -> None:
    assert own_findings(fleet) == []
    assert findings_json([]) == "[]"


# -- the application role --------------------------------------------------------------------


def test_app_role_with_bypassrls(tenancy: Tenancy, tenancy_server: TestServer) -> None:
    role = tenancy.config.app_role
    superuser_sql(tenancy_server, tenancy.url.database or "", f'ALTER ROLE "{role}" BYPASSRLS')
    try:
        finding = only(own_findings(tenancy), "app-role-bypassrls")
        assert finding.severity == "error"
        assert finding.fix == f'ALTER ROLE "{role}" NOBYPASSRLS'
    finally:
        superuser_sql(tenancy_server, tenancy.url.database or "", f'ALTER ROLE "{role}" NOBYPASSRLS')


def test_app_role_owning_a_tenant_table(tenancy: Tenancy, tenancy_server: TestServer) -> None:
    database = tenancy.url.database or ""
    superuser_sql(tenancy_server, database, f'ALTER TABLE projects OWNER TO "{tenancy.config.app_role}"')
    finding = only(own_findings(tenancy), "app-role-owns-table")
    assert finding.severity == "error"
    assert finding.object == "table projects"
    assert finding.fix.startswith("ALTER TABLE projects OWNER TO ")


def test_app_role_member_of_a_role_that_owns_tenant_tables(
    tenancy: Tenancy, tenancy_server: TestServer
) -> None:
    owner = f"{tenancy.name_prefix}_owner"
    superuser_sql(
        tenancy_server,
        tenancy.url.database or "",
        f'CREATE ROLE "{owner}" NOLOGIN',
        f'ALTER TABLE tasks OWNER TO "{owner}"',
        f'GRANT "{owner}" TO "{tenancy.config.app_role}"',
    )
    findings = own_findings(tenancy)
    member = [f for f in findings if f.check == "app-role-member"]
    assert len(member) == 1 and member[0].severity == "error"
    assert member[0].fix == f'REVOKE "{owner}" FROM "{tenancy.config.app_role}"'
    # the role carries the prefix and no registry row names it
    assert {f.check for f in findings} == {"app-role-member", "orphan"}


# -- row-level security, policies, views ----------------------------------------------------


def test_rls_not_enabled(tenancy: Tenancy) -> None:
    admin_sql(tenancy, "ALTER TABLE tasks DISABLE ROW LEVEL SECURITY")
    finding = only(own_findings(tenancy), "rls-disabled")
    assert (finding.severity, finding.fix) == ("error", "ALTER TABLE tasks ENABLE ROW LEVEL SECURITY")


def test_rls_not_forced(tenancy: Tenancy) -> None:
    admin_sql(tenancy, "ALTER TABLE auth.users NO FORCE ROW LEVEL SECURITY")
    finding = only(own_findings(tenancy), "rls-not-forced")
    assert (finding.severity, finding.fix) == ("error", "ALTER TABLE auth.users FORCE ROW LEVEL SECURITY")


def test_a_command_without_policy(tenancy: Tenancy) -> None:
    admin_sql(tenancy, "DROP POLICY tenancy_delete ON projects")
    finding = only(own_findings(tenancy), "policy-missing")
    assert finding.severity == "warning"
    assert "DELETE" in finding.problem


def test_a_permissive_policy_that_does_not_check_the_tenant(tenancy: Tenancy) -> None:
    admin_sql(tenancy, "CREATE POLICY everyone ON projects FOR SELECT USING (true)")
    finding = only(own_findings(tenancy), "policy-without-tenant")
    assert finding.severity == "error"
    assert finding.fix.startswith('DROP POLICY "everyone" ON projects')


def test_a_view_without_security_invoker(tenancy: Tenancy) -> None:
    admin_sql(tenancy, "CREATE VIEW project_names AS SELECT name FROM projects")
    finding = only(own_findings(tenancy), "view-not-security-invoker")
    assert finding.severity == "error"
    assert finding.fix == "ALTER VIEW project_names SET (security_invoker = true)"
    admin_sql(tenancy, "ALTER VIEW project_names SET (security_invoker = true)")
    assert own_findings(tenancy) == []


# -- keys -------------------------------------------------------------------------------------


def test_a_unique_constraint_without_tenant_id(tenancy: Tenancy) -> None:
    admin_sql(tenancy, "ALTER TABLE projects ADD CONSTRAINT projects_name_key UNIQUE (name)")
    finding = only(own_findings(tenancy), "key-without-tenant")
    assert finding.severity == "error"
    assert "UNIQUE (name)" in finding.problem
    assert "UNIQUE (tenant_id, ...)" in finding.fix


def test_a_foreign_key_without_tenant_id(tenancy: Tenancy) -> None:
    admin_sql(
        tenancy,
        "ALTER TABLE projects ADD CONSTRAINT projects_id_key UNIQUE (id)",
        "ALTER TABLE tasks ADD CONSTRAINT tasks_project_fkey "
        "FOREIGN KEY (project_id) REFERENCES projects (id)",
    )
    findings = [f for f in own_findings(tenancy) if f.check == "key-without-tenant"]
    assert {f.object for f in findings} == {
        "constraint projects_id_key on projects",
        "constraint tasks_project_fkey on tasks",
    }
    (fk,) = [f for f in findings if "FOREIGN KEY" in f.problem]
    assert fk.severity == "error" and "tenant_foreign_key" in fk.fix


# -- functions --------------------------------------------------------------------------------


def test_a_security_definer_function_without_search_path(tenancy: Tenancy) -> None:
    admin_sql(
        tenancy,
        "CREATE FUNCTION auth.count_users() RETURNS bigint LANGUAGE sql SECURITY DEFINER "
        "AS 'SELECT count(*) FROM auth.users'",
    )
    finding = only(own_findings(tenancy), "definer-search-path")
    assert finding.severity == "error"
    assert finding.fix == "ALTER FUNCTION auth.count_users() SET search_path = pg_catalog, pg_temp"


def test_a_security_definer_function_called_by_a_policy(tenancy: Tenancy) -> None:
    admin_sql(
        tenancy,
        "CREATE FUNCTION public.is_member(t uuid) RETURNS boolean LANGUAGE sql STABLE SECURITY DEFINER "
        "SET search_path = pg_catalog AS 'SELECT t IS NOT NULL'",
        "CREATE POLICY members ON projects AS RESTRICTIVE FOR SELECT USING (public.is_member(tenant_id))",
    )
    finding = only(own_findings(tenancy), "definer-in-policy")
    assert finding.severity == "error"
    assert "SECURITY INVOKER" in finding.fix


# -- databases and privileges -----------------------------------------------------------------


def test_public_may_create_temporary_tables_in_the_main_database(tenancy: Tenancy) -> None:
    database = tenancy.url.database
    admin_sql(tenancy, f'GRANT TEMPORARY ON DATABASE "{database}" TO PUBLIC')
    finding = only(own_findings(tenancy), "public-temporary")
    assert (finding.severity, finding.fix) == (
        "error",
        f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC',
    )


def test_public_may_connect_to_the_main_database(tenancy: Tenancy) -> None:
    database = tenancy.url.database
    admin_sql(tenancy, f'GRANT CONNECT ON DATABASE "{database}" TO PUBLIC')
    finding = only(own_findings(tenancy), "public-connect")
    assert finding.severity == "error"
    assert finding.fix.startswith(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')


def test_an_admission_of_an_earlier_version(tenancy: Tenancy) -> None:
    """The procedure as earlier versions made it: the lock taken after the row was read, and no
    look at the row version afterwards. A rerun of install() replaces it."""
    admin_sql(
        tenancy,
        "CREATE OR REPLACE PROCEDURE tenancy.admit(tenant uuid, placement text) LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM FROM tenancy.tenants WHERE id = tenant AND status = 'active' "
        "AND strategy = placement AND pg_try_advisory_xact_lock_shared(hashtext('sqla_tenancy:serving:' "
        "|| tenant::text)); IF NOT FOUND THEN RAISE EXCEPTION 'refused' USING ERRCODE = 'TNREF'; "
        "END IF; END $$",
    )
    finding = only(own_findings(tenancy), "admission-outdated")
    assert finding.severity == "error"
    assert "tenancy.admit(uuid, text)" in finding.problem
    assert finding.fix.startswith("tenancy.install()")
    tenancy.install()
    assert own_findings(tenancy) == []


def test_a_tenant_database_open_to_public(fleet: Tenancy) -> None:
    database = fleet.get_tenant("initech").location["database"]
    admin_sql(fleet, f'GRANT CONNECT ON DATABASE "{database}" TO PUBLIC')
    findings = own_findings(fleet)
    checks = {f.check for f in findings}
    # and so the other tenants' login roles (and FDW roles) can open it
    assert "tenant-database-public-connect" in checks
    assert checks <= {"tenant-database-public-connect", "role-opens-other-database"}
    (finding,) = [f for f in findings if f.check == "tenant-database-public-connect"]
    assert finding.severity == "error" and "REVOKE CONNECT, TEMPORARY" in finding.fix


def test_a_tenant_login_role_that_can_open_another_database(
    fleet: Tenancy, tenancy_server: TestServer
) -> None:
    role = fleet.get_tenant("initech").location["role"]
    superuser_sql(tenancy_server, "postgres", f'GRANT CONNECT ON DATABASE postgres TO "{role}"')
    try:
        finding = only(own_findings(fleet), "role-opens-other-database")
        assert finding.severity == "error"
        assert finding.fix == f'REVOKE CONNECT ON DATABASE "postgres" FROM "{role}"'
    finally:
        superuser_sql(tenancy_server, "postgres", f'REVOKE CONNECT ON DATABASE postgres FROM "{role}"')


# -- the FDW ----------------------------------------------------------------------------------


def test_an_fdw_role_that_bypasses_rls(fleet: Tenancy, tenancy_server: TestServer) -> None:
    role = fleet.get_tenant("initech").location["fdw_role"]
    superuser_sql(tenancy_server, "postgres", f'ALTER ROLE "{role}" BYPASSRLS')
    finding = only(own_findings(fleet), "fdw-role-bypassrls")
    assert (finding.severity, finding.fix) == ("error", f'ALTER ROLE "{role}" NOSUPERUSER NOBYPASSRLS')


def test_an_fdw_mapping_not_bound_to_its_tenant(fleet: Tenancy, tenancy_server: TestServer) -> None:
    initech, globex = fleet.get_tenant("initech"), fleet.get_tenant("globex")
    other = fdw_role_name(globex.id, fleet.name_prefix)
    database = initech.location["database"]
    superuser_sql(
        tenancy_server,
        database,
        f'ALTER USER MAPPING FOR "{fleet.admin_url.username}" SERVER tenancy_main '
        f"OPTIONS (SET user '{other}')",
    )
    finding = only(own_findings(fleet), "fdw-mapping-unbound")
    assert finding.severity == "error"
    assert f"user mapping for {fleet.admin_url.username}" in finding.object


def test_foreign_tables_that_differ_from_the_main_tables(fleet: Tenancy) -> None:
    admin_sql(fleet, "ALTER TABLE auth.users ADD COLUMN nickname text")
    finding = only(own_findings(fleet), "foreign-table-differs")
    assert finding.severity == "warning"
    assert finding.fix == "tenancy.refresh_foreign_schemas('initech')"
    fleet.refresh_foreign_schemas("initech")
    assert own_findings(fleet) == []


# -- the registry -----------------------------------------------------------------------------


def test_a_registry_row_without_its_schema(fleet: Tenancy) -> None:
    schema = fleet.get_tenant("globex").location["schema"]
    admin_sql(fleet, f'DROP SCHEMA "{schema}" CASCADE')
    finding = only(own_findings(fleet), "tenant-object-missing")
    assert finding.severity == "error"
    assert finding.object == "tenant globex" and schema in finding.problem


def test_a_role_with_the_prefix_and_no_registry_row(fleet: Tenancy) -> None:
    role = f"{fleet.name_prefix}_left_behind_app"
    admin_sql(fleet, f'CREATE ROLE "{role}" NOLOGIN')
    finding = only(own_findings(fleet), "orphan")
    assert finding.severity == "warning"
    assert finding.object == f"role {role} on server main"
    assert finding.fix.endswith(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')


def test_a_database_with_the_prefix_and_no_registry_row(fleet: Tenancy, tenancy_server: TestServer) -> None:
    database = f"{fleet.name_prefix}_forgotten"
    tenancy_server.execute(f'CREATE DATABASE "{database}"')
    tenancy_server.execute(f'REVOKE CONNECT, TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
    try:
        finding = only(own_findings(fleet), "orphan")
        assert finding.object == f"database {database} on server main"
        assert finding.fix.endswith(f'DROP DATABASE "{database}"')
    finally:
        tenancy_server.execute(f'DROP DATABASE "{database}"')


def test_a_sandbox_role_left_by_a_crashed_run(fleet: Tenancy) -> None:
    acme = fleet.get_tenant("acme")
    role = fdw_role_name(acme.id, fleet.name_prefix)
    admin_sql(fleet, f'CREATE ROLE "{role}" LOGIN')
    finding = only(own_findings(fleet), "sandbox-role")
    assert finding.severity == "warning" and "'acme'" in finding.problem
