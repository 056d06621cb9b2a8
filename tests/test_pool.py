"""Instant database tenants: pending tenants provisioned ahead, claimed atomically by
create_tenant, and working as any database tenant once claimed."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from sqla_tenancy import Tenancy, TenantEvent, TenantNotFound, UnsupportedOperation, tenant_context
from sqla_tenancy.testing import TestServer
from tests.doctor_helpers import own_findings

from .models import Project, User


@pytest.fixture
def t(tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[Tenancy]:
    tenancy.prepare_server(tenancy_server.superuser_url)
    yield tenancy


def test_a_pending_tenant_is_claimed_and_works(t: Tenancy) -> None:
    pool = t.fill_pool(2)
    assert [p.status for p in t.pending_tenants()] == ["pending", "pending"]
    assert own_findings(t) == []
    with pytest.raises(TenantNotFound):  # nobody can reach a pending tenant
        with tenant_context(pool[0].slug), t.sessionmaker()() as s:
            s.execute(select(Project))
    seeded: list[str] = []
    t.on("after_create", lambda e: seeded.append(e.slug))

    acme = t.create_tenant("acme", placement="database")
    assert acme.id == pool[0].id and acme.slug == "acme" and acme.is_active
    assert acme.location["database"] == f"{t.name_prefix}_acme"
    assert [p.id for p in t.pending_tenants()] == [pool[1].id]
    assert seeded == ["acme"]
    with tenant_context("acme"), t.sessionmaker()() as s:
        s.add_all([Project(name="claimed"), User(email="a@acme.test")])
        s.commit()
    with tenant_context("acme"), t.sessionmaker()() as s:
        assert s.scalars(select(Project.name)).all() == ["claimed"]
        assert s.scalars(select(User.email)).all() == ["a@acme.test"]
    assert own_findings(t) == []

    t.create_tenant("globex", placement="database")
    t.create_tenant("initech", placement="database")  # the pool is empty: provisioned as usual
    assert t.pending_tenants() == []
    with tenant_context("initech"), t.sessionmaker()() as s:
        assert s.scalars(select(Project)).all() == []
    t.delete_tenant("acme")
    assert own_findings(t) == []


def test_a_failed_claim_leaves_the_pool_as_it_was(t: Tenancy) -> None:
    (pending,) = t.fill_pool(1)

    def fail(step: str) -> None:
        if step == "claim":
            raise RuntimeError("injected at claim")

    t._fault_injector = fail
    with pytest.raises(RuntimeError, match="injected at claim"):
        t.create_tenant("acme", placement="database")
    t._fault_injector = None
    assert [(p.id, p.slug) for p in t.pending_tenants()] == [(pending.id, pending.slug)]
    with pytest.raises(TenantNotFound):
        t.get_tenant("acme")
    assert own_findings(t) == []
    assert t.create_tenant("acme", placement="database").id == pending.id


def test_concurrent_claims_take_different_tenants(t: Tenancy) -> None:
    pool = {p.id for p in t.fill_pool(2)}
    made: dict[str, object] = {}

    def create(slug: str) -> None:
        made[slug] = t.create_tenant(slug, placement="database").id

    threads = [threading.Thread(target=create, args=(slug,)) for slug in ("acme", "globex")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(made.values()) == pool


def test_a_busy_pending_database_is_skipped_for_a_fresh_one(t: Tenancy) -> None:
    (pending,) = t.fill_pool(1)
    placement = t.placement("database")
    engine = placement._admin("main", pending.location["database"])  # type: ignore[attr-defined]
    try:
        with engine.connect() as conn:  # somebody is connected to it: it cannot be renamed now
            conn.execute(text("select 1"))
            acme = t.create_tenant("acme", placement="database")
    finally:
        engine.dispose()
    assert acme.id != pending.id
    assert [p.id for p in t.pending_tenants()] == [pending.id]


def test_the_pool_is_for_the_main_server(t: Tenancy) -> None:
    with pytest.raises(UnsupportedOperation, match="main server"):
        t.fill_pool(1, server="other")


def test_step_events_name_the_claim(t: Tenancy) -> None:
    t.fill_pool(1)
    steps: list[str | None] = []
    t.on("step", lambda e: steps.append(e.step) if isinstance(e, TenantEvent) else None)
    t.create_tenant("acme", placement="database")
    assert steps == ["claim", "activate"]


def test_pending_tenants_follow_infrastructure_changes(t: Tenancy) -> None:
    (pending,) = t.fill_pool(1)
    with t.admin_engine.begin() as conn:
        conn.execute(text("ALTER TABLE auth.users ADD COLUMN nickname text"))
    assert pending.id in {r.id for r in t.refresh_foreign_schemas()}
    t.create_tenant("acme", placement="database")
    assert [f.check for f in own_findings(t)] == []
