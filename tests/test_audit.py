"""The audit trail: every write made in platform_context (ORM or raw SQL) is recorded by the
database, per tenant whose rows were written; tenants' own writes only when configured."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text, update

from sqla_tenancy import Tenancy, platform_context, tenant_context
from sqla_tenancy.testing import TestServer
from tests.doctor_helpers import own_findings

from .models import Project, User


def seed(t: Tenancy, slug: str, n: int = 2, *, user: str = "u") -> None:
    with tenant_context(slug), t.sessionmaker()() as s:
        s.add_all([Project(name=f"{slug}-{i}") for i in range(n)] + [User(email=f"{user}@{slug}.test")])
        s.commit()


@pytest.fixture
def t(tenancy: Tenancy) -> Iterator[Tenancy]:
    tenancy.create_tenant("acme")
    tenancy.create_tenant("globex")
    tenancy.create_tenant("initech", placement="schema")
    for slug, n in (("acme", 2), ("globex", 3), ("initech", 1)):
        seed(tenancy, slug, n)
    tenancy.install_audit()
    yield tenancy


def test_a_platform_write_is_recorded_per_tenant(t: Tenancy) -> None:
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    with platform_context("ticket 42: rename projects"), t.sessionmaker()() as s:
        s.execute(update(Project).values(name=Project.name + "!"))
        s.commit()
    entries = t.audit_log(since=start)
    assert sorted((e.tenant, e.table, e.operation, e.rows) for e in entries) == [
        ("acme", "public.projects", "UPDATE", 2),
        ("globex", "public.projects", "UPDATE", 3),
    ]
    assert {e.reason for e in entries} == {"ticket 42: rename projects"}
    assert {e.actor for e in entries} == {t.admin_url.username}
    assert len({e.transaction_id for e in entries}) == 1
    assert [e.tenant for e in t.audit_log(tenant="acme")] == ["acme"]


def test_raw_sql_is_recorded_too(t: Tenancy) -> None:
    with platform_context("cleanup script"), t.admin_engine.begin() as conn:
        conn.execute(text("delete from auth.users where email like 'u@acme%'"))
        conn.execute(text('delete from "{}".projects'.format(t.get_tenant("initech").location["schema"])))
    entries = t.audit_log()
    assert sorted((e.tenant, e.table, e.operation, e.rows, e.reason) for e in entries) == [
        ("acme", "auth.users", "DELETE", 1, "cleanup script"),
        ("initech", f"{t.get_tenant('initech').location['schema']}.projects", "DELETE", 1, "cleanup script"),
    ]


def test_a_bypassing_write_without_a_reason_is_recorded_with_none(t: Tenancy) -> None:
    with t.admin_engine.begin() as conn:  # the admin role bypasses RLS, and gave no reason
        conn.execute(text("update projects set name = 'x' where name = 'acme-0'"))
    (entry,) = t.audit_log()
    assert (entry.tenant, entry.rows, entry.reason) == ("acme", 1, None)


def test_tenants_own_writes_are_not_recorded_unless_asked(t: Tenancy) -> None:
    seed(t, "acme", user="v")
    assert t.audit_log() == []
    t.install_audit(tenant_writes=True)
    seed(t, "acme", 1, user="w")
    recorded = sorted((e.tenant, e.table, e.operation, e.rows, e.reason) for e in t.audit_log())
    assert recorded == [
        ("acme", "auth.users", "INSERT", 1, None),
        ("acme", "public.projects", "INSERT", 1, None),
    ]
    assert {e.role for e in t.audit_log()} == {t.config.app_role}


def test_a_new_schema_tenant_is_audited_from_birth(t: Tenancy) -> None:
    t.create_tenant("hooli", placement="schema")
    seed(t, "hooli", 1)
    schema = t.get_tenant("hooli").location["schema"]
    with platform_context("fix hooli"), t.admin_engine.begin() as conn:
        conn.execute(text(f'update "{schema}".projects set name = name'))
    (entry,) = t.audit_log()
    assert (entry.tenant, entry.table, entry.reason) == ("hooli", f"{schema}.projects", "fix hooli")


def test_nobody_but_the_admin_reads_the_trail(t: Tenancy) -> None:
    with pytest.raises(Exception, match="permission denied"):
        with tenant_context("acme"), t.engine.connect() as conn:
            conn.execute(text("select * from tenancy.audit_log"))
    assert own_findings(t) == []


def test_install_audit_is_idempotent(t: Tenancy, tenancy_server: TestServer) -> None:
    t.install_audit()
    with platform_context("again"), t.admin_engine.begin() as conn:
        conn.execute(text("update projects set name = name where name = 'acme-0'"))
    assert len(t.audit_log()) == 1


async def test_an_async_platform_write_carries_its_reason(t: Tenancy) -> None:
    Session = t.async_sessionmaker()
    with platform_context("async backfill"):
        async with Session() as s:
            await s.execute(update(Project).where(Project.name == "acme-0").values(name="acme-0"))
            await s.commit()
    (entry,) = t.audit_log()
    assert (entry.tenant, entry.reason) == ("acme", "async backfill")
    await t.dispose_async()
