"""Moving a tenant between the shared and schema placements: rows copied and checked, registry
switched, source removed, in one transaction; read-only meanwhile; a failure at any step leaves
the tenant active at its source with every row."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import exc, select, text

from sqla_tenancy import Tenancy, TenantEvent, UnsupportedOperation, tenant_context
from sqla_tenancy.move import MoveError
from sqla_tenancy.testing import TestServer
from tests.doctor_helpers import own_findings

from .models import Project, Task, User

STEPS = ["move_read_only", "move_provision", "move_copy", "move_verify", "move_remove_source", "move_switch"]


def seed(t: Tenancy, slug: str) -> None:
    with tenant_context(slug), t.sessionmaker()() as s:
        for n in range(3):
            project = Project(name=f"{slug}-{n}")
            s.add(project)
            s.flush()
            s.add(Task(project_id=project.id, title=f"{slug}-{n}-t"))
        s.add(User(email=f"u@{slug}.test"))
        s.commit()


def content(t: Tenancy, slug: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[str]]:
    with tenant_context(slug), t.sessionmaker()() as s:
        return (
            [tuple(r) for r in s.execute(select(Project.id, Project.name).order_by(Project.id))],  # type: ignore[misc]
            [tuple(r) for r in s.execute(select(Task.project_id, Task.title).order_by(Task.id))],  # type: ignore[misc]
            list(s.scalars(select(User.email))),
        )


def policies(t: Tenancy) -> list[str]:
    with t.admin_engine.connect() as conn:
        return list(
            conn.execute(text("select polname from pg_policy where polname like 'tenancy_moving%'")).scalars()
        )


@pytest.fixture
def t(tenancy: Tenancy) -> Iterator[Tenancy]:
    tenancy.create_tenant("acme")
    tenancy.create_tenant("globex")
    seed(tenancy, "acme")
    seed(tenancy, "globex")
    yield tenancy


def test_shared_to_schema_and_back(t: Tenancy) -> None:
    before, others = content(t, "acme"), content(t, "globex")
    events: list[str] = []
    t.on("before_move", lambda e: events.append(f"{e.name}:{e.details['from']}->{e.placement}"))
    t.on("after_move", lambda e: events.append(f"{e.name}:{e.tenant.strategy if e.tenant else None}"))

    moved = t.move_tenant("acme", "schema")
    assert moved.strategy == "schema" and moved.location["schema"] and moved.is_active
    assert content(t, "acme") == before
    assert content(t, "globex") == others
    with t.admin_engine.connect() as conn:  # the shared tables hold none of its rows any more
        assert (
            conn.execute(text("select count(*) from projects where tenant_id = :t"), {"t": moved.id}).scalar()
            == 0
        )
    assert own_findings(t) == []

    back = t.move_tenant("acme", "shared")
    assert back.strategy == "shared"
    assert content(t, "acme") == before
    assert events == [
        "before_move:shared->schema",
        "after_move:schema",
        "before_move:schema->shared",
        "after_move:shared",
    ]
    assert own_findings(t) == []


@pytest.mark.parametrize("source", ["shared", "schema"])
@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_any_step_leaves_the_tenant_at_its_source(t: Tenancy, source: str, step: str) -> None:
    slug, target = "acme", "schema"
    if source == "schema":
        t.move_tenant("acme", "schema")  # its keys are free in the shared tables to go back to
        target = "shared"
    before = content(t, slug)
    tenant = t.get_tenant(slug)

    def fail(name: str) -> None:
        if name == step:
            raise RuntimeError(f"injected at {name}")

    t._fault_injector = fail
    with pytest.raises(MoveError, match=f"injected at {step}"):
        t.move_tenant(slug, target)
    t._fault_injector = None
    after = t.get_tenant(slug)
    assert (after.strategy, after.location, after.status) == (tenant.strategy, tenant.location, "active")
    assert content(t, slug) == before
    assert policies(t) == []
    with tenant_context(slug), t.sessionmaker()() as s:  # writable again
        s.add(Project(name="still here"))
        s.commit()
    assert own_findings(t) == []


def test_a_shared_tenant_is_read_only_during_the_move(t: Tenancy) -> None:
    seen: dict[str, object] = {}

    def during(event: TenantEvent) -> None:
        if event.step != "move_copy":
            return

        def as_the_tenant() -> None:  # another connection, as the application serves it
            with tenant_context("acme"), t.sessionmaker()() as s:
                seen["read"] = len(s.scalars(select(Project)).all())
                s.add(Project(name="written during the move"))
                try:
                    s.commit()
                except exc.ProgrammingError as error:
                    seen["write"] = type(error).__name__
            with tenant_context("globex"), t.sessionmaker()() as s:  # other tenants write on
                s.add(Project(name="globex during the move"))
                s.commit()
                seen["other"] = "ok"

        thread = threading.Thread(target=as_the_tenant)
        thread.start()
        thread.join(30)

    t.on("step", during)
    t.move_tenant("acme", "schema")
    assert seen == {"read": 3, "write": "ProgrammingError", "other": "ok"}
    assert [name for _, name in content(t, "acme")[0]] == ["acme-0", "acme-1", "acme-2"]


def test_a_moved_tenants_keys_continue_after_the_copied_ones(t: Tenancy) -> None:
    t.move_tenant("acme", "schema")
    highest = max(i for i, _ in content(t, "acme")[0])
    with tenant_context("acme"), t.sessionmaker()() as s:
        project = Project(name="after the move")
        s.add(project)
        s.commit()
        assert project.id == highest + 1


def test_keys_that_collide_in_the_shared_tables_fail_the_move_cleanly(t: Tenancy) -> None:
    t.create_tenant("initech", placement="schema")
    seed(t, "initech")  # ids 1..3 in its own schema; acme and globex hold 1..6 in the shared tables
    before = content(t, "initech")
    with pytest.raises(MoveError, match="duplicate key"):
        t.move_tenant("initech", "shared")
    assert t.get_tenant("initech").strategy == "schema"
    assert content(t, "initech") == before


def test_unsupported_moves_are_refused_before_anything(t: Tenancy, tenancy_server: TestServer) -> None:
    with pytest.raises(UnsupportedOperation, match="already"):
        t.move_tenant("acme", "shared")
    with pytest.raises(UnsupportedOperation, match="not supported yet"):
        t.move_tenant("acme", "database")
    with pytest.raises(UnsupportedOperation, match="default tenant"):
        t.move_tenant("default", "schema")
    t.suspend_tenant("acme")
    with pytest.raises(UnsupportedOperation, match="suspended"):
        t.move_tenant("acme", "schema")
