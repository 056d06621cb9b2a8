"""Instant database tenants: pending tenants provisioned ahead, claimed atomically by
create_tenant, and working as any database tenant once claimed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from sqla_tenancy import (
    ConfigurationError,
    Tenancy,
    TenantEvent,
    TenantNotFound,
    UnsupportedOperation,
    tenant_context,
)
from sqla_tenancy.testing import TestServer
from tests.doctor_helpers import own_findings

from .conftest import SECRET
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


# -- a pool kept at its size: Tenancy(pending_tenants={"database": N}) ---------------------------


def _sized(t: Tenancy, size: int) -> Tenancy:
    """Another process's Tenancy over the same databases, keeping ``size`` pending tenants."""
    return Tenancy(
        t.url,
        admin_url=t.admin_url,
        metadata=t.metadata,
        infrastructure_schemas=t.infrastructure_schemas,
        name_prefix=t.name_prefix,
        secret_key=SECRET,
        pending_tenants={"database": size},
    )


def _wait_for_pool(t: Tenancy, size: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [p.slug for p in t.pending_tenants()]
        if len(pending) >= size:
            return pending
        time.sleep(0.1)
    raise AssertionError(f"the pool did not reach {size} in {timeout:g} s: {t.pending_tenants()}")


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ({"schema": 2}, "only database tenants can be provisioned ahead"),
        ({"database": -1}, "must be an int >= 0"),
        ({"database": "5"}, "must be an int >= 0"),
        ({"database": True}, "must be an int >= 0"),
    ],
)
def test_a_bad_pool_size_is_refused(t: Tenancy, size: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Tenancy(t.url, metadata=t.metadata, pending_tenants=size)  # type: ignore[arg-type]


def test_refill_tops_the_pool_up_to_its_size(t: Tenancy) -> None:
    with pytest.raises(ConfigurationError, match="pending_tenants"):
        t.refill_pool()  # no size configured
    sized = _sized(t, 2)
    try:
        t.fill_pool(1)
        assert len(sized.refill_pool()) == 1
        assert sized.refill_pool() == []  # full
        assert len(t.pending_tenants()) == 2
        assert own_findings(sized) == []
        assert t.refill_pool(target=3) and len(t.pending_tenants()) == 3
    finally:
        sized.dispose()


def test_a_claim_is_replaced_in_the_background(t: Tenancy) -> None:
    sized = _sized(t, 2)
    try:
        sized.refill_pool()
        first = {p.id for p in sized.pending_tenants()}
        acme = sized.create_tenant("acme", placement="database")  # claims, then refills
        assert acme.id in first
        pending = _wait_for_pool(sized, 2)
        assert len(pending) == 2 and all(slug.startswith("pending_") for slug in pending)
        with tenant_context("acme"), sized.sessionmaker()() as s:
            assert s.scalars(select(Project)).all() == []
        sized.create_tenant("globex", placement="database")
        sized.create_tenant("initech", placement="database")
        _wait_for_pool(sized, 2)
        sized._stop_refill()
        assert len(sized.pending_tenants()) == 2  # not more: one refill at a time
        assert own_findings(sized) == []
    finally:
        sized.dispose()


def test_two_processes_refilling_at_once_do_not_overfill(t: Tenancy) -> None:
    first, second = _sized(t, 3), _sized(t, 3)
    made: list[int] = []
    try:
        threads = [
            threading.Thread(target=lambda s=s: made.append(len(s.refill_pool()))) for s in (first, second)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(t.pending_tenants()) == 3
        assert sum(made) == 3
    finally:
        first.dispose()
        second.dispose()


def test_dispose_stops_a_refill_after_the_tenant_in_progress(t: Tenancy) -> None:
    sized = _sized(t, 5)
    sized.create_tenant("acme", placement="database")  # the pool is empty: provisioned, then refill starts
    _wait_for_pool(sized, 1)
    sized.dispose()  # waits for the tenant being provisioned, leaves the rest
    count = len(t.pending_tenants())
    assert 1 <= count < 5
    time.sleep(1)
    assert len(t.pending_tenants()) == count  # nothing provisions any more
    assert own_findings(t) == []


def test_the_doctor_reports_a_pool_below_its_size(t: Tenancy) -> None:
    sized = _sized(t, 1)
    try:
        findings = [f for f in sized.doctor() if f.check == "pool-below-size"]
        assert len(findings) == 1 and findings[0].severity == "warning"
        assert findings[0].fix == "sqla-tenancy tenants pool --refill"
        sized.refill_pool()
        assert [f for f in sized.doctor() if f.check == "pool-below-size"] == []
    finally:
        sized.dispose()
