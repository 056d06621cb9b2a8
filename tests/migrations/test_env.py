"""Plain Alembic commands through the env.py helper: every tenant by default, -x to narrow."""

from __future__ import annotations

import io

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from alembic_ext import MigrationError
from alembic_ext.versions import INFRASTRUCTURE, TENANT
from sqla_tenancy import tenant_context

from .conftest import Project
from .test_fleet import ADD_PRIORITY, DROP_PRIORITY, project_columns, registry_revisions


@pytest.fixture
def tenants(migrated: Project) -> Project:
    t = migrated.tenancy
    t.prepare_server(migrated.server.superuser_url)
    t.create_tenant("acme", placement="schema")
    t.create_tenant("globex", placement="schema")
    t.create_tenant("initech", placement="database")
    t.create_tenant("umbrella", placement="shared")
    return migrated


def test_upgrade_head_reaches_every_tenant(tenants: Project) -> None:
    new = tenants.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
    command.upgrade(tenants.config(), "head")
    for slug in ("default", "umbrella", "acme", "globex", "initech"):
        assert "priority" in project_columns(tenants.tenancy, slug), slug
    assert set(registry_revisions(tenants.tenancy).values()) == {new}


def test_x_tenant_and_x_stream_narrow_the_run(tenants: Project) -> None:
    old = tenants.heads(TENANT)[0]
    new = tenants.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
    infra = tenants.add_revision(
        INFRASTRUCTURE, 'op.add_column("plans", sa.Column("price", sa.Integer()), schema="auth")'
    )
    command.upgrade(tenants.config(tenant="acme,initech"), "head")
    revisions = registry_revisions(tenants.tenancy)
    assert revisions["acme"] == revisions["initech"] == new
    assert revisions["globex"] == revisions["default"] == revisions["umbrella"] == old
    assert "price" not in {
        c["name"] for c in inspect(tenants.tenancy.admin_engine).get_columns("plans", "auth")
    }

    command.upgrade(tenants.config(stream="infrastructure"), "head")
    assert "price" in {c["name"] for c in inspect(tenants.tenancy.admin_engine).get_columns("plans", "auth")}
    assert registry_revisions(tenants.tenancy)["globex"] == old
    with tenants.tenancy.admin_engine.connect() as conn:
        assert conn.execute(text("select version_num from tenancy.alembic_infrastructure")).scalar() == infra

    # a shared tenant's location is the main database: it moves every shared tenant
    command.upgrade(tenants.config(tenant="umbrella"), "head")
    revisions = registry_revisions(tenants.tenancy)
    assert revisions["umbrella"] == revisions["default"] == new and revisions["globex"] == old


def test_downgrade_and_current_per_tenant(tenants: Project) -> None:
    old = tenants.heads(TENANT)[0]
    new = tenants.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
    command.upgrade(tenants.config(), "head")
    command.downgrade(tenants.config(tenant="acme"), "-1")
    assert "priority" not in project_columns(tenants.tenancy, "acme")
    assert "priority" in project_columns(tenants.tenancy, "globex")
    assert registry_revisions(tenants.tenancy)["acme"] == old

    out = io.StringIO()
    cfg = tenants.config(tenant="acme,globex")
    cfg.stdout = out
    command.current(cfg)
    text_out = out.getvalue()
    assert "tenant acme (schema " in text_out and "tenant globex (schema " in text_out
    acme_part, globex_part = text_out.split("tenant globex")
    assert old in acme_part and new not in acme_part and new in globex_part

    out = io.StringIO()
    cfg = tenants.config(stream="infrastructure")
    cfg.stdout = out
    command.current(cfg)
    assert "infrastructure stream, main database" in out.getvalue()
    assert tenants.heads(INFRASTRUCTURE)[0] in out.getvalue()


def test_stamp_per_tenant(tenants: Project) -> None:
    new = tenants.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
    command.stamp(tenants.config(tenant="globex"), "head")
    assert registry_revisions(tenants.tenancy)["globex"] == new
    assert "priority" not in project_columns(tenants.tenancy, "globex")  # stamped, not run


@pytest.mark.parametrize("kind", ["engine", "connection"])
def test_a_connection_in_config_attributes_is_used(project: Project, kind: str) -> None:
    """What pytest-alembic does: hand env.py an Engine or a Connection."""
    engine = create_engine(project.tenancy.admin_url)
    try:
        cfg = project.config()
        if kind == "engine":
            cfg.attributes["connection"] = engine
            command.upgrade(cfg, "head")
        else:
            with engine.connect() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
        assert "projects" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


NICKNAME = 'op.add_column("users", sa.Column("nickname", sa.Text()), schema="auth")'


def test_an_infrastructure_upgrade_refreshes_the_database_tenants_foreign_tables(tenants: Project) -> None:
    tenants.add_revision(INFRASTRUCTURE, NICKNAME)
    command.upgrade(tenants.config(stream="infrastructure"), "head")
    with tenant_context("initech"), tenants.tenancy.connect() as conn:
        assert conn.execute(text("select count(nickname) from auth.users")).scalar() == 0


@pytest.mark.timeout(120)
def test_an_infrastructure_upgrade_in_the_callers_transaction_leaves_the_refresh_to_after(
    tenants: Project, caplog: pytest.LogCaptureFixture
) -> None:
    """A Connection handed over inside a transaction of the caller's: the infrastructure stream
    runs in a savepoint, and nothing of it is committed when env.py returns. The database tenants'
    foreign tables cannot be refreshed then (the refresh runs on connections of its own, which
    would wait for the caller's transaction, forever): env.py says so, and the refresh after the
    commit finds the new column."""
    tenants.add_revision(INFRASTRUCTURE, NICKNAME)
    engine = create_engine(tenants.tenancy.admin_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))  # the caller's transaction has begun
            cfg = tenants.config(stream="infrastructure")
            cfg.attributes["connection"] = conn
            with caplog.at_level("WARNING", logger="alembic_ext"):
                command.upgrade(cfg, "head")
            conn.commit()
    finally:
        engine.dispose()
    assert "refresh_foreign_schemas()" in caplog.text
    tenants.tenancy.refresh_foreign_schemas()
    with tenant_context("initech"), tenants.tenancy.connect() as conn:
        assert conn.execute(text("select count(nickname) from auth.users")).scalar() == 0


@pytest.mark.parametrize(
    ("x", "message"),
    [
        ({"stream": "nope"}, "use 'infrastructure' or 'tenant'"),
        ({"stream": "infrastructure", "tenant": "acme"}, "cannot go with"),
        ({"colour": "blue"}, "Unknown -x option"),
    ],
)
def test_bad_x_arguments_are_refused(project: Project, x: dict[str, str], message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        command.upgrade(project.config(**x), "head")


def test_unknown_tenant_is_refused_before_anything_runs(tenants: Project) -> None:
    from sqla_tenancy import TenantNotFound

    tenants.add_revision(TENANT, ADD_PRIORITY, downgrade=DROP_PRIORITY)
    with pytest.raises(TenantNotFound):
        command.upgrade(tenants.config(tenant="acme,nobody"), "head")
    assert "priority" not in project_columns(tenants.tenancy, "acme")


def test_offline_mode_writes_the_infrastructure_stream(project: Project) -> None:
    out = io.StringIO()
    cfg = project.config(stream="infrastructure")
    cfg.output_buffer = out
    command.upgrade(cfg, "head", sql=True)
    assert "CREATE TABLE auth.users" in out.getvalue()
    with pytest.raises(MigrationError, match="Offline"):
        command.upgrade(project.config(), "head", sql=True)
