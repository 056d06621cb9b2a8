"""The tenant lifecycle and the registry cache shared across processes."""

from __future__ import annotations

import multiprocessing

import pytest
from sqlalchemy import func, select, text

from sqla_tenancy import (
    ProvisioningError,
    Tenancy,
    TenancyError,
    Tenant,
    TenantNotFound,
    tenant_context,
)

from .models import Project, Task, User
from .registry_probe import watch_until_suspended


def test_lifecycle(tenancy: Tenancy) -> None:
    acme = tenancy.create_tenant("acme", name="ACME Corp")
    assert isinstance(acme, Tenant)
    assert (acme.slug, acme.name, acme.strategy, acme.status) == ("acme", "ACME Corp", "shared", "active")
    assert tenancy.get_tenant("acme") == acme
    assert tenancy.get_tenant(acme.id) == acme
    assert [t.slug for t in tenancy.list_tenants()] == ["default", "acme"]
    assert tenancy.update_tenant("acme", name="Acme").name == "Acme"
    assert tenancy.suspend_tenant("acme").status == "suspended"
    assert tenancy.resume_tenant("acme").status == "active"
    with pytest.raises(ProvisioningError, match="exists already"):
        tenancy.create_tenant("acme")
    with pytest.raises(TenantNotFound):
        tenancy.suspend_tenant("nobody")
    with pytest.raises(TenancyError, match="default tenant"):
        tenancy.delete_tenant("default")
    with pytest.raises(TenancyError, match="default tenant"):
        tenancy.suspend_tenant("default")


def test_unknown_strategy_creates_nothing(tenancy: Tenancy) -> None:
    with pytest.raises(ProvisioningError, match="Unknown placement"):
        tenancy.create_tenant("acme", placement="cloud")
    assert [t.slug for t in tenancy.list_tenants()] == ["default"]


def test_delete_removes_exactly_the_tenants_rows(tenancy: Tenancy) -> None:
    maker = tenancy.sessionmaker()
    for slug in ("acme", "globex"):
        tenancy.create_tenant(slug)
        with tenant_context(slug), maker() as s:
            project = Project(name=f"{slug}-p")
            s.add(project)
            s.flush()
            s.add_all([Task(project_id=project.id, title="t"), User(email=f"x@{slug}.test")])
            s.commit()
    tenancy.delete_tenant("acme")
    with pytest.raises(TenantNotFound):
        tenancy.get_tenant("acme")
    with tenancy.admin_engine.connect() as conn:  # the admin role bypasses RLS: sees every row
        for table in ("projects", "tasks", "auth.users"):
            assert conn.execute(text(f"select count(*) from {table}")).scalar() == 1
    with tenant_context("globex"), maker() as s:
        assert s.scalar(select(func.count()).select_from(Project)) == 1
    with tenant_context("acme"), maker() as s, pytest.raises(TenantNotFound):
        s.execute(select(Project))
    tenancy.create_tenant("acme")  # the slug is free again


def test_install_is_idempotent(tenancy: Tenancy) -> None:
    tenancy.create_tenant("acme")
    tenancy.install()
    tenancy.install()
    assert [t.slug for t in tenancy.list_tenants()] == ["default", "acme"]


def _watch(tenancy: Tenancy, *, ttl: float, listen: bool, limit: float) -> float | None:
    tenancy.create_tenant("acme")
    mp = multiprocessing.get_context("spawn")
    ready, go, out = mp.Event(), mp.Event(), mp.Queue()
    url = tenancy.url.render_as_string(hide_password=False)
    child = mp.Process(target=watch_until_suspended, args=(url, "acme", ttl, listen, ready, go, out, limit))
    child.start()
    try:
        assert ready.wait(60), "the probe process did not start"
        tenancy.suspend_tenant("acme")
        go.set()
        elapsed: float | None = out.get(timeout=limit + 30)
        return elapsed
    finally:
        child.join(timeout=30)


def test_suspension_reaches_another_process_within_a_second(tenancy: Tenancy) -> None:
    # A long TTL: only the notification can make the other process notice in time.
    elapsed = _watch(tenancy, ttl=300.0, listen=True, limit=5.0)
    assert elapsed is not None and elapsed < 1.0


def test_ttl_bounds_staleness_without_the_listener(tenancy: Tenancy) -> None:
    elapsed = _watch(tenancy, ttl=0.5, listen=False, limit=5.0)
    assert elapsed is not None and elapsed < 1.0


def test_cache_is_really_a_cache(tenancy: Tenancy) -> None:
    # No listener, long TTL: the other process keeps its cached entry (so the test above passing
    # is the notification's doing, not a registry read per transaction).
    assert _watch(tenancy, ttl=300.0, listen=False, limit=1.5) is None


def test_strategy_is_the_deprecated_name_of_placement(tenancy: Tenancy) -> None:
    with pytest.warns(DeprecationWarning, match="placement="):
        tenant = tenancy.create_tenant("acme", strategy="schema")
    assert (tenant.placement, tenant.strategy) == ("schema", "schema")
    with pytest.raises(TypeError, match="not both"):
        tenancy.create_tenant("globex", placement="shared", strategy="shared")
