"""Reliability under load and faults: deleting tenants that other processes use, concurrent
provisioning, pools after their connections were killed."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from sqlalchemy import text

from sqla_tenancy import Tenancy, tenant_context
from sqla_tenancy.testing import TestServer

from .conftest import SECRET
from .fault_probe import hold_connections
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
