"""The tenant binding is transaction-local: nothing of it survives a transaction's end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, exc, func, select, text
from sqlalchemy.engine import Connection

from sqla_tenancy import (
    AutocommitNotAllowed,
    Tenancy,
    TenantNotFound,
    TenantRequired,
    TenantSuspended,
    UnsafeRoleError,
    platform_context,
    tenant_context,
)
from sqla_tenancy.testing import TestServer

from .models import INFRASTRUCTURE, Base, Project

SETTING = "select current_setting('app.current_tenant_id', true)"


def session_level_setting(conn: Connection) -> Any:
    """The setting as the server holds it outside any transaction, read on the same physical
    connection through the driver (which sqla-tenancy keeps in autocommit)."""
    driver = conn.connection.dbapi_connection
    assert driver is not None
    assert driver.info.transaction_status == 0  # IDLE: no transaction open
    return driver.execute(SETTING).fetchone()[0]  # type: ignore[union-attr,index]


@pytest.fixture
def single(tenancy_factory: Callable[..., Tenancy]) -> Iterator[Tenancy]:
    """One pooled connection only, so every checkout is the same physical connection."""
    t = tenancy_factory(
        Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        engine_options={"pool_size": 1, "max_overflow": 0},
    )
    t.install()
    t.create_tenant("acme")
    t.create_tenant("globex")
    with tenant_context("acme"), t.sessionmaker()() as s:
        s.add_all([Project(name="a1"), Project(name="a2")])
        s.commit()
    yield t


def test_binding_ends_with_commit_rollback_and_error(single: Tenancy) -> None:
    acme = single.get_tenant("acme")
    with single.engine.connect() as conn:
        with tenant_context("acme"):
            assert conn.execute(text(SETTING)).scalar() == str(acme.id)
            conn.commit()
            assert session_level_setting(conn) in (None, "")
            conn.execute(text("select 1"))
            conn.rollback()
            assert session_level_setting(conn) in (None, "")
            with pytest.raises(exc.DBAPIError):
                conn.execute(text("select 1/0"))
            conn.rollback()
            assert session_level_setting(conn) in (None, "")


def test_returned_connection_carries_nothing(single: Tenancy) -> None:
    with tenant_context("acme"), single.sessionmaker()() as s:
        assert s.scalar(select(func.count()).select_from(Project)) == 2
        s.commit()
    # the pool has one connection: this is the one the session used
    with single.engine.connect() as conn:
        assert session_level_setting(conn) in (None, "")


def test_savepoint_rollback_keeps_the_binding(single: Tenancy) -> None:
    with tenant_context("acme"), single.sessionmaker()() as s:
        nested = s.begin_nested()
        s.add(Project(name="temp"))
        s.flush()
        nested.rollback()
        assert s.scalar(select(func.count()).select_from(Project)) == 2
        with pytest.raises(exc.DBAPIError):
            with s.begin_nested():
                s.execute(text("select 1/0"))
        assert s.scalar(select(func.count()).select_from(Project)) == 2


def test_isolation_level_and_read_only_are_honoured(single: Tenancy) -> None:
    acme = single.get_tenant("acme")
    with tenant_context("acme"), single.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="SERIALIZABLE", postgresql_readonly=True)
        assert conn.execute(text("show transaction_isolation")).scalar() == "serializable"
        assert conn.execute(text("show transaction_read_only")).scalar() == "on"
        assert conn.execute(text(SETTING)).scalar() == str(acme.id)
        with pytest.raises(exc.DBAPIError, match="read-only"):
            conn.execute(text("insert into projects (name) values ('x')"))
        conn.rollback()
    # the next checkout is back to the defaults
    with tenant_context("acme"), single.engine.connect() as conn:
        assert conn.execute(text("show transaction_isolation")).scalar() == "read committed"
        assert conn.execute(text("show transaction_read_only")).scalar() == "off"


def test_autocommit_connection_is_refused_for_tenant_work(single: Tenancy) -> None:
    statements: list[str] = []
    event.listen(single.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with tenant_context("acme"), single.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(AutocommitNotAllowed, match="AUTOCOMMIT"):
            conn.execute(text("select count(*) from projects"))
    assert statements == []
    # Unbound (platform) work may still use autocommit, and RLS then hides every tenant row.
    with platform_context("maintenance"), single.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        assert conn.execute(text("select count(*) from projects")).scalar() == 0


def test_no_tenant_and_no_default_fails_before_any_sql(
    tenancy_factory: Callable[..., Tenancy],
) -> None:
    t = tenancy_factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE, default_tenant=None)
    t.install()
    statements: list[str] = []
    event.listen(t.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with t.sessionmaker()() as s, pytest.raises(TenantRequired):
        s.execute(select(Project))
    with t.engine.connect() as conn, pytest.raises(TenantRequired):
        conn.execute(text("select 1"))
    assert statements == []
    assert t.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_unknown_and_suspended_tenants_are_refused(single: Tenancy) -> None:
    maker = single.sessionmaker()
    with tenant_context("nobody"), maker() as s, pytest.raises(TenantNotFound):
        s.execute(select(Project))
    single.suspend_tenant("acme")
    with tenant_context("acme"), maker() as s, pytest.raises(TenantSuspended):
        s.execute(select(Project))
    with tenant_context("acme"), single.engine.connect() as conn, pytest.raises(TenantSuspended):
        conn.execute(text("select 1"))
    single.resume_tenant("acme")
    with tenant_context("acme"), maker() as s:
        assert s.scalar(select(func.count()).select_from(Project)) == 2


def test_tenant_named_by_uuid_string(single: Tenancy) -> None:
    acme = single.get_tenant("acme")
    with tenant_context(str(acme.id)), single.sessionmaker()() as s:
        assert s.scalar(select(func.count()).select_from(Project)) == 2


def test_platform_context_uses_the_admin_engine(single: Tenancy) -> None:
    with platform_context("count every tenant's projects"), single.sessionmaker()() as s:
        assert s.scalar(select(func.count()).select_from(Project)) == 2
        assert s.get_bind() is single.admin_engine


def test_superuser_application_role_is_refused(tenancy_server: TestServer, tenancy_database: str) -> None:
    url = tenancy_server.superuser_url.set(database=tenancy_database)
    admin = tenancy_server.url(tenancy_database, role="admin")
    unsafe = Tenancy(url, metadata=Base.metadata, admin_url=admin, infrastructure_schemas=INFRASTRUCTURE)
    try:
        unsafe.install()
        with unsafe.engine.connect() as conn, pytest.raises(UnsafeRoleError, match="superuser"):
            conn.execute(text("select 1"))
    finally:
        unsafe.dispose()
    allowed = Tenancy(
        url,
        metadata=Base.metadata,
        admin_url=admin,
        allow_bypassrls=True,
        infrastructure_schemas=INFRASTRUCTURE,
    )
    try:
        with allowed.engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar() == 1
    finally:
        allowed.dispose()


def test_bypassrls_application_role_is_refused(tenancy_server: TestServer, tenancy_database: str) -> None:
    admin = tenancy_server.url(tenancy_database, role="admin")
    unsafe = Tenancy(admin, metadata=Base.metadata, infrastructure_schemas=INFRASTRUCTURE)
    try:
        unsafe.install()
        with unsafe.sessionmaker()() as s, pytest.raises(UnsafeRoleError, match="BYPASSRLS"):
            s.execute(text("select 1"))
    finally:
        unsafe.dispose()


def test_server_side_cursors_run_inside_the_bound_transaction(single: Tenancy) -> None:
    with tenant_context("acme"), single.sessionmaker()() as s:
        s.add_all([Project(name=f"p{i}") for i in range(30)])
        s.commit()
    with tenant_context("acme"), single.engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=5).execute(
            text("select name from projects")
        )
        assert len(list(result)) == 32
        conn.commit()
    with tenant_context("globex"), single.sessionmaker()() as s:
        assert list(s.scalars(select(Project).execution_options(yield_per=7))) == []


def test_platform_insert_must_name_its_tenant(single: Tenancy) -> None:
    acme = single.get_tenant("acme")
    with platform_context("data repair"), single.sessionmaker()() as s:
        s.add(Project(name="orphan"))
        with pytest.raises(exc.StatementError, match="set tenant_id explicitly") as raised:
            s.flush()
        assert isinstance(raised.value.orig, TenantRequired)
        s.rollback()
        s.add(Project(name="repaired", tenant_id=acme.id))
        s.commit()
    with tenant_context("acme"), single.sessionmaker()() as s:
        assert "repaired" in s.scalars(select(Project.name)).all()
