"""Lifecycle events: callbacks before and after create, delete, suspend and resume, and at each
provisioning step; a failing before-callback aborts cleanly, after_create can seed the tenant."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from sqla_tenancy import HookFailed, Tenancy, TenantEvent, TenantNotFound, tenant_context
from sqla_tenancy.grants import is_keeper_role
from sqla_tenancy.testing import TestServer

from .models import Project


def objects(t: Tenancy) -> set[str]:
    """The Tenancy's databases, roles, schemas and registry rows (not its keeper roles, the
    library's own, made with the first schema tenants and kept)."""
    like = t.name_prefix.replace("_", "\\_") + "\\_%"
    with t.admin_engine.connect() as conn:
        return {
            name
            for name in conn.execute(
                text(
                    "select 'db ' || datname from pg_database where datname like :p union all "
                    "select 'role ' || rolname from pg_roles where rolname like :p union all "
                    "select 'schema ' || nspname from pg_namespace where nspname like :p union all "
                    "select 'tenant ' || slug from tenancy.tenants"
                ),
                {"p": like},
            ).scalars()
            if not (name.startswith("role ") and is_keeper_role(t.config, name[5:]))
        }


@pytest.fixture(params=["shared", "schema", "database"])
def t(request: pytest.FixtureRequest, tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[Tenancy]:
    if request.param == "database":
        tenancy.prepare_server(tenancy_server.superuser_url)
    tenancy.placement_under_test = request.param  # type: ignore[attr-defined]
    yield tenancy


def test_events_arrive_in_order_with_the_tenant(t: Tenancy) -> None:
    placement = t.placement_under_test  # type: ignore[attr-defined]
    seen: list[tuple[str, str, bool]] = []

    def record(event: TenantEvent) -> None:
        seen.append((event.name, event.slug, event.tenant is not None))

    for name in ("before_create", "after_create", "before_suspend", "after_suspend"):
        t.on(name, record)

    @t.on("before_resume")
    @t.on("after_resume")
    @t.on("before_delete")
    @t.on("after_delete")
    def also(event: TenantEvent) -> None:
        record(event)

    t.create_tenant("acme", placement=placement)
    t.suspend_tenant("acme")
    t.resume_tenant("acme")
    t.delete_tenant("acme")
    assert seen == [
        ("before_create", "acme", False),
        ("after_create", "acme", True),
        ("before_suspend", "acme", True),
        ("after_suspend", "acme", True),
        ("before_resume", "acme", True),
        ("after_resume", "acme", True),
        ("before_delete", "acme", True),
        ("after_delete", "acme", True),
    ]


def test_provisioning_steps_are_events(t: Tenancy) -> None:
    placement = t.placement_under_test  # type: ignore[attr-defined]
    steps: list[str] = []
    t.on("step", lambda e: steps.append(f"{e.slug}:{e.step}"))
    t.create_tenant("acme", placement=placement)
    expected = {
        "shared": ["register", "activate"],
        "schema": ["register", "schema", "tables", "role", "membership", "activate"],
        "database": ["template", "app_role", "database", "rename_database", "fdw_role", "fdw", "activate"],
    }[placement]
    assert [s.split(":")[1] for s in steps if s.split(":")[1] in expected] == expected
    assert all(s.startswith("acme:") for s in steps)


def test_a_failing_before_create_aborts_before_anything_is_made(t: Tenancy) -> None:
    placement = t.placement_under_test  # type: ignore[attr-defined]
    before = objects(t)

    def refuse(event: TenantEvent) -> None:
        raise PermissionError(f"{event.slug} is not on the plan")

    t.on("before_create", refuse)
    with pytest.raises(PermissionError, match="not on the plan"):
        t.create_tenant("acme", placement=placement)
    assert objects(t) == before
    t.off("before_create", refuse)
    t.create_tenant("acme", placement=placement)  # nothing was left in the way


def test_a_failing_step_callback_fails_provisioning_and_leaves_nothing(t: Tenancy) -> None:
    placement = t.placement_under_test  # type: ignore[attr-defined]
    before = objects(t)

    def fail(event: TenantEvent) -> None:
        if event.step == "activate":
            raise RuntimeError("metrics backend down")

    t.on("step", fail)
    with pytest.raises(Exception, match="metrics backend down"):
        t.create_tenant("acme", placement=placement)
    assert objects(t) == before


def test_after_create_seeds_the_new_tenant(t: Tenancy) -> None:
    placement = t.placement_under_test  # type: ignore[attr-defined]
    Session = t.sessionmaker()

    @t.on("after_create")
    def seed(event: TenantEvent) -> None:
        assert event.tenant is not None and event.tenant.is_active
        with tenant_context(event.tenant), Session() as s:
            s.add(Project(name="Welcome"))
            s.commit()

    t.create_tenant("acme", placement=placement)
    t.create_tenant("globex", placement=placement)
    for slug in ("acme", "globex"):
        with tenant_context(slug), Session() as s:
            assert s.scalars(select(Project.name)).all() == ["Welcome"]


def test_a_failing_after_create_deletes_the_tenant_again(t: Tenancy) -> None:
    placement = t.placement_under_test  # type: ignore[attr-defined]
    before = objects(t)

    @t.on("after_create")
    def broken_seed(event: TenantEvent) -> None:
        raise ValueError("seed data missing")

    with pytest.raises(HookFailed, match="deleted again") as raised:
        t.create_tenant("acme", placement=placement)
    assert isinstance(raised.value.__cause__, ValueError)
    assert objects(t) == before
    with pytest.raises(TenantNotFound):
        t.get_tenant("acme")


def test_a_failing_before_delete_keeps_the_tenant(t: Tenancy) -> None:
    placement = t.placement_under_test  # type: ignore[attr-defined]
    t.create_tenant("acme", placement=placement)
    t.on("before_delete", lambda e: (_ for _ in ()).throw(PermissionError("legal hold")))
    with pytest.raises(PermissionError, match="legal hold"):
        t.delete_tenant("acme")
    assert t.get_tenant("acme").is_active


def test_unknown_events_are_refused(tenancy: Tenancy) -> None:
    with pytest.raises(ValueError, match="Unknown event 'after_creat'"):
        tenancy.on("after_creat", print)  # type: ignore[call-overload]
