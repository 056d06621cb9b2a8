"""Reliability under load and faults: deleting tenants that other processes use, concurrent
provisioning, pools after their connections were killed."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from sqlalchemy import text

from sqla_tenancy import Tenancy, TenantRefused, tenant_context
from sqla_tenancy.testing import TestServer

from .conftest import SECRET
from .fault_probe import hold_connections, write_until_refused
from .models import Project, User


def child_options(t: Tenancy) -> dict[str, Any]:
    """What another process of the same application passes to Tenancy."""
    return {
        "url": t.url.render_as_string(hide_password=False),
        "admin_url": t.admin_url.render_as_string(hide_password=False),
        "secret_key": SECRET,
        "name_prefix": t.name_prefix,
    }


def catalog(t: Tenancy) -> dict[str, set[str]]:
    with t.admin_engine.connect() as conn:
        return {
            "databases": set(conn.execute(text("select datname from pg_database")).scalars()),
            "roles": set(conn.execute(text("select rolname from pg_roles")).scalars()),
            "tenants": set(conn.execute(text("select slug from tenancy.tenants")).scalars()),
        }


@pytest.fixture
def dbt(tenancy: Tenancy, tenancy_server: TestServer) -> Tenancy:
    tenancy.prepare_server(tenancy_server.superuser_url)
    tenancy.create_tenant("acme", placement="database")
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        s.add_all([Project(name="p"), User(email="x@acme.test")])
        s.commit()
    return tenancy


def test_delete_a_database_tenant_another_process_holds_connections_to(dbt: Tenancy) -> None:
    mp = multiprocessing.get_context("spawn")
    ready, go, out = mp.Event(), mp.Event(), mp.Queue()
    child = mp.Process(target=hold_connections, args=(child_options(dbt), "acme", ready, go, out))
    child.start()
    try:
        assert ready.wait(60), "the probe process did not start"
        dbt.delete_tenant("acme")
        go.set()
        dropped, refused = out.get(timeout=60)
    finally:
        child.join(timeout=30)
    left = catalog(dbt)
    assert not {d for d in left["databases"] if d.startswith(f"{dbt.name_prefix}_acme")}
    assert not {r for r in left["roles"] if r.startswith(f"{dbt.name_prefix}_acme")}
    assert "acme" not in left["tenants"]
    assert dropped is not None and dropped < 1.0, "the other process kept the deleted tenant's pool"
    assert refused == "TenantNotFound"


@pytest.mark.parametrize("placement", ["shared", "schema", "database"])
def test_delete_under_concurrent_writers_leaves_nothing(
    tenancy: Tenancy, tenancy_server: TestServer, placement: str
) -> None:
    if placement == "database":
        tenancy.prepare_server(tenancy_server.superuser_url)
    acme = tenancy.create_tenant("acme", placement=placement)
    mp = multiprocessing.get_context("spawn")
    ready, out = mp.Event(), mp.Queue()
    child = mp.Process(target=write_until_refused, args=(child_options(tenancy), "acme", 3, ready, out))
    child.start()
    try:
        assert ready.wait(60), "the writers did not start"
        tenancy.delete_tenant("acme")
        commits, stopped = out.get(timeout=90)
    finally:
        child.join(timeout=30)
    print(f"{placement}: {commits} commits before the deletion; writers stopped by {stopped}")
    with tenancy.admin_engine.connect() as conn:
        left = {
            table: conn.execute(
                text(f"select count(*) from {table} where tenant_id = :t"), {"t": acme.id}
            ).scalar()
            for table in ("auth.users", "projects")
        }
    assert left == {"auth.users": 0, "projects": 0}
    assert "acme" not in catalog(tenancy)["tenants"]


@pytest.mark.parametrize("placement", ["shared", "schema"])
def test_the_database_refuses_a_tenant_a_stale_cache_still_serves(tenancy: Tenancy, placement: str) -> None:
    tenancy.create_tenant("acme", placement=placement)
    stale = Tenancy(
        tenancy.url,
        admin_url=tenancy.admin_url,
        metadata=tenancy.metadata,
        infrastructure_schemas=tenancy.infrastructure_schemas,
        name_prefix=tenancy.name_prefix,
        registry_ttl=300.0,
        registry_listen=False,  # nothing tells this one
    )
    try:
        with tenant_context("acme"), stale.engine.connect() as conn:
            assert conn.execute(text("select count(*) from projects")).scalar() == 0
        tenancy.suspend_tenant("acme")
        with tenant_context("acme"), stale.engine.connect() as conn, pytest.raises(TenantRefused):
            conn.execute(text("select count(*) from projects"))
        assert stale.get_tenant("acme").status == "active"  # its cache had not caught up
    finally:
        stale.dispose()
