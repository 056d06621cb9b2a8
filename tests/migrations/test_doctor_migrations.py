"""The doctor on a project managed by migrations: at head it reports nothing; a tenant revision
not yet applied shows every tenant, and the template, behind head."""

from __future__ import annotations

from alembic_ext import migrate_fleet
from alembic_ext.versions import TENANT
from tests.doctor_helpers import own_findings

from .conftest import Project


def test_tenants_and_template_behind_the_head(migrated: Project) -> None:
    t = migrated.tenancy
    t.prepare_server(migrated.server.superuser_url)
    t.create_tenant("acme", placement="schema")
    t.create_tenant("initech", placement="database")
    # The migrations path does not take from PUBLIC what CREATE DATABASE gives it on the main
    # database (install() does): the doctor says so, with the fix.
    opened = own_findings(t)
    assert {f.check for f in opened} == {"public-connect", "public-temporary", "role-opens-other-database"}
    with t.admin_engine.begin() as conn:
        for finding in opened:
            conn.exec_driver_sql(finding.fix)
    assert own_findings(t) == []

    migrated.add_revision(TENANT, 'op.add_column("projects", sa.Column("code", sa.Text()))')
    findings = own_findings(t)
    behind = {f.object for f in findings if f.check == "tenant-behind-head"}
    assert behind == {"tenant default", "tenant acme", "tenant initech"}
    assert all(f.severity == "warning" for f in findings)
    (template,) = [f for f in findings if f.check == "template-behind-head"]
    assert template.object == f"database {t.name_prefix}_template on server main"
    assert {f.check for f in findings} == {"tenant-behind-head", "template-behind-head"}
    assert [f.fix for f in findings if f.object == "tenant acme"] == ["sqla-tenancy migrate --tenant acme"]

    migrate_fleet(t, migrated.config())
    assert own_findings(t) == []
