"""Across tenants: a function per tenant (as that tenant), and one SELECT over every tenant's
rows, tagged with their tenant, over all three placements."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from sqla_tenancy import Tenancy, current_tenant, tenant_context
from sqla_tenancy.testing import TestServer

from .models import Project, Task

PLACEMENTS = {"s1": "shared", "s2": "shared", "c1": "schema", "d1": "database"}


@pytest.fixture
def t(tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[Tenancy]:
    tenancy.prepare_server(tenancy_server.superuser_url)
    Session = tenancy.sessionmaker()
    for slug, placement in PLACEMENTS.items():
        tenancy.create_tenant(slug, placement=placement)
        with tenant_context(slug), Session() as s:
            for n in range(2):
                project = Project(name=f"{slug}-{n}")
                s.add(project)
                s.flush()
                s.add(Task(project_id=project.id, title=f"{slug}-{n}-t"))
            s.commit()
    yield tenancy


def test_for_each_tenant_runs_as_each_tenant(t: Tenancy, caplog: pytest.LogCaptureFixture) -> None:
    Session = t.sessionmaker()

    def count(tenant: object) -> int:
        current = current_tenant()
        assert current is not None and current == tenant
        with Session() as s:
            return int(s.scalar(select(func.count()).select_from(Project)) or 0)

    with caplog.at_level(logging.INFO, logger="sqla_tenancy.platform"):
        results = t.for_each_tenant(count, reason="test: count projects", concurrency=3)
    assert {r.tenant.slug: r.value for r in results} == {"default": 0, **{slug: 2 for slug in PLACEMENTS}}
    assert all(r.ok for r in results)
    assert "test: count projects" in caplog.text


def test_for_each_tenant_reports_failures_and_goes_on(t: Tenancy) -> None:
    def fail_on_c1(tenant: object) -> str:
        if getattr(tenant, "slug", None) == "c1":
            raise RuntimeError("boom")
        return "done"

    results = t.for_each_tenant(fail_on_c1, reason="test", placements=["schema", "database"])
    assert [(r.tenant.slug, r.ok) for r in results] == [("c1", False), ("d1", True)]
    assert isinstance(results[0].error, RuntimeError)


def test_a_reason_is_required(t: Tenancy) -> None:
    with pytest.raises(ValueError, match="reason"):
        t.for_each_tenant(lambda tenant: None, reason=" ")
    with pytest.raises(ValueError, match="reason"):
        t.query_all_tenants(select(Project.name), reason="")


def test_query_all_tenants_tags_each_row(t: Tenancy) -> None:
    rows = t.query_all_tenants(select(Project.name).order_by(Project.name), reason="test: report")
    tagged = [(r.tenant.slug, r.row.name) for r in rows]
    expected = [(slug, f"{slug}-{n}") for slug in PLACEMENTS for n in range(2)]
    assert sorted(tagged) == sorted(expected)
    # each tenant's rows in the statement's order
    assert [name for slug, name in tagged if slug == "s1"] == ["s1-0", "s1-1"]


def test_a_join_stays_within_each_tenant(t: Tenancy) -> None:
    statement = select(Project.name, Task.title).join(Task, Task.project_id == Project.id)
    rows = t.query_all_tenants(statement, reason="test: join")
    assert all(r.row.title.startswith(r.row.name) for r in rows)
    assert all(r.row.name.startswith(r.tenant.slug) for r in rows)
    assert len(rows) == 8


def test_query_all_tenants_by_placement(t: Tenancy) -> None:
    rows = t.query_all_tenants(select(Project.name), reason="test", placements=["shared"])
    assert {r.tenant.slug for r in rows} == {"s1", "s2"}


def test_suspended_tenants_are_left_out(t: Tenancy) -> None:
    t.suspend_tenant("d1")
    rows = t.query_all_tenants(select(Project.name), reason="test")
    assert {r.tenant.slug for r in rows} == {"s1", "s2", "c1"}


def test_aggregates_stay_per_tenant(t: Tenancy) -> None:
    statement = (
        select(Project.name, func.count(Task.id).label("tasks"))
        .join(Task, Task.project_id == Project.id)
        .group_by(Project.name)
    )
    rows = t.query_all_tenants(statement, reason="test: usage report")
    assert sorted((r.tenant.slug, r.row.name, r.row.tasks) for r in rows) == sorted(
        (slug, f"{slug}-{n}", 1) for slug in PLACEMENTS for n in range(2)
    )
