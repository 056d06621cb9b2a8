"""The fleet runner over every placement: who is behind, parallel workers, failures, the lock."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from alembic_ext import MigrationLocked, migrate_fleet
from alembic_ext.versions import TENANT
from sqla_tenancy import Tenancy

from .conftest import APP, Project

ADD_PRIORITY = """
op.add_column("projects", sa.Column("priority", sa.Integer(), nullable=True))
op.create_index("ix_projects_priority", "projects", ["priority"])
"""
DROP_PRIORITY = """
op.drop_index("ix_projects_priority", table_name="projects")
op.drop_column("projects", "priority")
"""


def project_columns(tenancy: Tenancy, slug: str) -> set[str]:
    """The columns of ``projects`` where tenant ``slug`` keeps it."""
    tenant = tenancy.get_tenant(slug)
    if tenant.strategy == "database":
        placement = tenancy.placement("database")
        engine = placement._admin("main", tenant.location["database"], autocommit=False)  # type: ignore[attr-defined]
        try:
            return {c["name"] for c in inspect(engine).get_columns("projects")}
        finally:
            engine.dispose()
    schema = tenant.location.get("schema")
    return {c["name"] for c in inspect(tenancy.admin_engine).get_columns("projects", schema=schema)}


def registry_revisions(tenancy: Tenancy) -> dict[str, str | None]:
    with tenancy.admin_engine.connect() as conn:
        return dict(conn.execute(text("select slug, revision from tenancy.tenants")).all())  # type: ignore[arg-type]


@pytest.fixture
def fleet(migrated: Project) -> Project:
    """Shared, schema and database tenants, all born at the tenant stream's head."""
    t = migrated.tenancy
    t.prepare_server(migrated.server.superuser_url)
    for slug, strategy in (
        ("s1", "shared"),
        ("s2", "shared"),
        ("c1", "schema"),
        ("c2", "schema"),
        ("d1", "database"),
        ("d2", "database"),
    ):
        t.create_tenant(slug, placement=strategy)
    return migrated


def test_tenants_are_born_at_head(fleet: Project) -> None:
    head = fleet.heads(TENANT)[0]
    assert set(registry_revisions(fleet.tenancy).values()) == {head}
    with fleet.tenancy.admin_engine.connect() as conn:
        schema = fleet.tenancy.get_tenant("c1").location["schema"]
        stamped = conn.execute(text(f'select version_num from "{schema}".alembic_tenant')).scalar()
        # the tenant's own role cannot rewrite its version row
        role = fleet.tenancy.get_tenant("c1").location["role"]
        allowed = conn.execute(
            text("select has_table_privilege(:r, :t, 'UPDATE')"),
            {"r": role, "t": f'"{schema}".alembic_tenant'},
        ).scalar()
    assert stamped == head and allowed is False


def test_one_revision_reaches_every_location(fleet: Project, tmp_path: Path) -> None:
    new = fleet.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
    report = migrate_fleet(APP, fleet.ini, jobs=2, report_path=tmp_path / "report.json")
    assert report.ok, report.as_dict()
    kinds = sorted(o.kind for o in report.outcomes if o.status == "upgraded")
    assert kinds == ["database", "database", "main", "schema", "schema", "template"]
    for slug in ("default", "s1", "c1", "c2", "d1", "d2"):
        assert "priority" in project_columns(fleet.tenancy, slug), slug
    assert set(registry_revisions(fleet.tenancy).values()) == {new}
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["counts"]["upgraded"] == 6 and written["target"] == new
    assert {loc["after"] for loc in written["locations"]} == {new}

    # Nothing to do: no tenant location is connected to (only the template is looked at).
    again = migrate_fleet(APP, fleet.ini, jobs=2)
    assert again.ok and again.skipped_at_target == 5
    assert [(o.kind, o.status) for o in again.outcomes] == [("template", "unchanged")]

    # A database tenant created now is cloned from the upgraded template: born at the new head.
    fleet.tenancy.create_tenant("d3", placement="database")
    assert registry_revisions(fleet.tenancy)["d3"] == new
    assert "priority" in project_columns(fleet.tenancy, "d3")


def test_a_failing_tenant_keeps_its_revision_and_data(project: Project, tmp_path: Path) -> None:
    t = project.tenancy
    slugs = [f"t{i:02d}" for i in range(20)]
    broken = "t07"
    revision = project.schema_fleet_with_a_broken_tenant(slugs, broken)
    before = t.get_tenant("t00").revision
    schema = t.get_tenant(broken).location["schema"]
    with t.admin_engine.begin() as conn:
        conn.exec_driver_sql(
            f"SET LOCAL app.current_tenant_id = '{t.get_tenant(broken).id}'; "
            f"INSERT INTO \"{schema}\".projects (name, code) VALUES ('keep me', 7)"
        )
    assert before is not None and before != revision
    report = migrate_fleet(APP, project.ini, jobs=2, continue_on_error=True, report_path=tmp_path / "r.json")
    assert not report.ok
    [failed] = report.failed
    assert failed.location == broken and failed.before == before and failed.after == before
    assert "DuplicateColumn" in (failed.error or "") and "_change.py:" in (failed.error or "")
    upgraded = {o.location for o in report.outcomes if o.status == "upgraded"}
    assert upgraded == {"main", *slugs} - {broken}
    revisions = registry_revisions(t)
    assert revisions[broken] == before and all(revisions[s] == revision for s in slugs if s != broken)
    with t.admin_engine.connect() as conn:
        assert conn.execute(text(f'select version_num from "{schema}".alembic_tenant')).scalar() == before
        assert conn.execute(text(f'select name, code from "{schema}".projects')).all() == [("keep me", 7)]
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["failed"] == 1

    # Fix the migration; a re-run touches only the tenant that is still behind.
    path = next(Path(project.root, "migrations", "tenant").glob(f"*{revision}*.py"))
    path.write_text(
        path.read_text().replace(
            'op.add_column("projects", sa.Column("code", sa.Text()))',
            'op.execute("ALTER TABLE projects ADD COLUMN IF NOT EXISTS code text")',
        )
    )
    rerun = migrate_fleet(APP, project.ini, jobs=2)
    assert rerun.ok
    assert [(o.location, o.status) for o in rerun.outcomes] == [(broken, "upgraded")]
    assert rerun.skipped_at_target == 20  # main and the 19 others
    assert set(registry_revisions(t).values()) == {revision}


def test_without_continue_on_error_the_run_stops(project: Project) -> None:
    t = project.tenancy
    project.schema_fleet_with_a_broken_tenant([f"t{i}" for i in range(6)], "t0")
    report = migrate_fleet(t, project.ini, jobs=1)
    assert [o.status for o in report.outcomes] == ["upgraded", "failed"] + ["not_run"] * 5
    assert report.stopped


def test_canary_stops_the_run(project: Project) -> None:
    project.schema_fleet_with_a_broken_tenant([f"t{i}" for i in range(8)], "t1")
    report = migrate_fleet(APP, project.ini, jobs=2, canary=3, continue_on_error=True)
    statuses = {o.location: o.status for o in report.outcomes}
    assert statuses["t1"] == "failed"
    assert [statuses[f"t{i}"] for i in range(3, 8)] == ["not_run"] * 5
    assert "canary" in (report.stopped or "")


def test_a_second_run_is_refused_or_waits(migrated: Project) -> None:
    t = migrated.tenancy
    with t.admin_engine.connect() as holder:
        holder.exec_driver_sql("select pg_advisory_lock(hashtext('sqla_tenancy:migrate'))")
        holder.commit()
        pid = holder.exec_driver_sql("select pg_backend_pid()").scalar()
        with pytest.raises(MigrationLocked, match=f"pid {pid}"):
            migrate_fleet(t, migrated.ini)

        def release() -> None:
            time.sleep(1.0)
            holder.exec_driver_sql("select pg_advisory_unlock(hashtext('sqla_tenancy:migrate'))")
            holder.commit()

        releaser = threading.Thread(target=release)
        started = time.monotonic()
        releaser.start()
        report = migrate_fleet(t, migrated.ini, wait_for_lock=True)
        releaser.join()
    assert report.ok and time.monotonic() - started >= 0.9


def test_a_tenant_being_provisioned_is_waited_for(fleet: Project) -> None:
    t = fleet.tenancy
    fleet.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
    with t.admin_engine.connect() as provisioning:  # what create_tenant holds for a slug
        provisioning.exec_driver_sql("select pg_advisory_lock(hashtext('sqla_tenancy:provision:' || 'c1'))")
        provisioning.commit()

        def release() -> None:
            time.sleep(1.0)
            provisioning.exec_driver_sql(
                "select pg_advisory_unlock(hashtext('sqla_tenancy:provision:' || 'c1'))"
            )
            provisioning.commit()

        releaser = threading.Thread(target=release)
        releaser.start()
        report = migrate_fleet(t, fleet.ini, tenants=["c1"])
        releaser.join()
    [outcome] = report.outcomes
    assert outcome.status == "upgraded" and outcome.seconds >= 0.9


def test_an_infrastructure_rename_leaves_no_broken_foreign_table(fleet: Project) -> None:
    from alembic_ext.versions import INFRASTRUCTURE
    from sqla_tenancy import tenant_context

    fleet.add_revision(
        INFRASTRUCTURE,
        'op.alter_column("users", "email", new_column_name="email_address", schema="auth")',
    )
    report = migrate_fleet(APP, fleet.ini, jobs=2)
    assert report.ok and report.infrastructure is not None
    assert report.infrastructure.status == "upgraded" and report.refreshed_foreign_schemas == 2
    for slug in ("d1", "d2"):
        with tenant_context(slug), fleet.tenancy.connect() as conn:
            conn.execute(text("insert into auth.users (email_address) values ('a@example.com')"))
            assert conn.execute(text("select email_address from auth.users")).scalars().all() == [
                "a@example.com"
            ]
            conn.commit()


def test_a_tenant_deleted_while_waiting_is_not_migrated(fleet: Project) -> None:
    t = fleet.tenancy
    fleet.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
    results = []
    with t.admin_engine.connect() as holder:
        holder.exec_driver_sql("select pg_advisory_lock(hashtext('sqla_tenancy:provision:' || 'c1'))")
        holder.commit()
        runner = threading.Thread(target=lambda: results.append(migrate_fleet(t, fleet.ini, tenants=["c1"])))
        runner.start()
        time.sleep(0.5)
        with t.admin_engine.begin() as conn:  # what delete_tenant does first for a journaled tenant
            conn.exec_driver_sql("update tenancy.tenants set status = 'deleting' where slug = 'c1'")
        holder.exec_driver_sql("select pg_advisory_unlock(hashtext('sqla_tenancy:provision:' || 'c1'))")
        holder.commit()
        runner.join()
    [outcome] = results[0].outcomes
    assert outcome.status == "not_run" and outcome.error == "deleted during the run"
    assert "priority" not in project_columns(t, "c1")


def test_cloning_the_template_waits_for_its_migration(fleet: Project) -> None:
    from sqla_tenancy.locks import template_key

    t = fleet.tenancy
    created = []
    with t.admin_engine.connect() as holder:  # what the runner holds while migrating the template
        key = template_key(f"{t.name_prefix}_template")
        holder.execute(text("select pg_advisory_lock(hashtext(:k))"), {"k": key})
        holder.commit()
        creator = threading.Thread(target=lambda: created.append(t.create_tenant("d9", placement="database")))
        creator.start()
        time.sleep(0.7)
        assert not created  # still waiting
        holder.execute(text("select pg_advisory_unlock(hashtext(:k))"), {"k": key})
        holder.commit()
        creator.join(timeout=60)
    assert created and created[0].slug == "d9"


def test_a_migration_brings_anonymous_grants_in_line_with_the_models(fleet: Project) -> None:
    """A tenant whose anonymous role lacks an opted-in table (created before the opt-in) gets it
    when the fleet runner migrates that tenant."""
    from sqla_tenancy.anonymous import tenant_anonymous_role

    t = fleet.tenancy
    c1, d1 = t.get_tenant("c1"), t.get_tenant("d1")
    c1_anon, d1_anon = tenant_anonymous_role(t.config, "c1"), tenant_anonymous_role(t.config, "d1")
    d1_engine = t.placement("database")._admin("main", d1.location["database"], autocommit=False)  # type: ignore[attr-defined]
    c1_projects = f'"{c1.location["schema"]}".projects'
    try:
        with t.admin_engine.begin() as conn:
            conn.exec_driver_sql(f'REVOKE SELECT ON {c1_projects} FROM "{c1_anon}"')
        with d1_engine.begin() as conn:
            conn.exec_driver_sql(f'REVOKE SELECT ON public.projects FROM "{d1_anon}"')
        fleet.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
        assert migrate_fleet(t, fleet.ini).ok
        with t.admin_engine.connect() as conn:
            select = "select has_table_privilege(:r, :t, 'SELECT'), has_table_privilege(:r, :t, 'INSERT')"
            assert conn.execute(text(select), {"r": c1_anon, "t": c1_projects}).one() == (True, False)
        with d1_engine.connect() as conn:
            assert conn.execute(text(select), {"r": d1_anon, "t": "public.projects"}).one() == (True, False)
    finally:
        d1_engine.dispose()
