"""Tenant isolation, written once and run against every placement.

Each placement subclasses :class:`IsolationSuite` and sets ``placement``; the schema and database
placements join here as they land. Every assertion is about what PostgreSQL returns or refuses.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import delete, exc, func, insert, inspect, select, text, update
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    relationship,
    selectinload,
    sessionmaker,
)

from sqla_tenancy import Tenancy, TenancyError, Tenant, platform_context, tenant_context
from sqla_tenancy.testing import TestServer

from .models import Project, Task, User


class _Related(AsyncAttrs, DeclarativeBase):
    """The same tables as Project and Task, mapped with relationships (lazy and selectin)."""


class ProjectR(_Related):
    __table__ = Project.__table__
    tasks: Mapped[list[TaskR]] = relationship(back_populates="project", order_by="TaskR.id")
    eager_tasks: Mapped[list[TaskR]] = relationship(lazy="selectin", viewonly=True, order_by="TaskR.id")


class TaskR(_Related):
    __table__ = Task.__table__
    project: Mapped[ProjectR] = relationship(back_populates="tasks")


def token(tenant: Tenant) -> str:
    return str(tenant.id)


@dataclass
class World:
    tenancy: Tenancy
    a: Tenant
    b: Tenant
    Session: sessionmaker[Session]


class IsolationSuite:
    placement: str

    @pytest.fixture
    def world(self, tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[World]:
        if self.placement == "database":
            tenancy.prepare_server(tenancy_server.superuser_url)
        a = tenancy.create_tenant("acme", placement=self.placement)
        b = tenancy.create_tenant("globex", placement=self.placement)
        maker = tenancy.sessionmaker()
        for tenant, names in ((a, ["a1", "a2", "a3"]), (b, ["b1", "b2"])):
            with tenant_context(tenant), maker() as s:
                projects = [Project(name=n) for n in names]
                s.add_all(projects)
                s.flush()
                s.add_all(Task(project_id=p.id, title=f"{p.name}-task") for p in projects)
                s.add(User(email=f"owner@{tenant.slug}.test"))
                s.commit()
        yield World(tenancy, a, b, maker)

    def test_raw_select_sees_only_own_rows(self, world: World) -> None:
        for tenant, expected in ((world.a, {"a1", "a2", "a3"}), (world.b, {"b1", "b2"})):
            with tenant_context(tenant.slug), world.Session() as s:
                names = set(s.execute(text("select name from projects")).scalars())
                assert names == expected

    def test_orm_query_sees_only_own_rows(self, world: World) -> None:
        with tenant_context(world.b), world.Session() as s:
            assert sorted(s.scalars(select(Project.name))) == ["b1", "b2"]
            assert s.scalar(select(func.count()).select_from(Task)) == 2
            assert s.scalars(select(User.email)).all() == ["owner@globex.test"]

    def test_get_by_primary_key_never_returns_another_tenants_row(self, world: World) -> None:
        with tenant_context(world.a), world.Session() as s:
            a_ids = list(s.scalars(select(Project.id)))
        with tenant_context(world.b), world.Session() as s:
            for pk in a_ids:
                # Placements with their own sequences may reuse the key: then it is b's own row.
                got = s.get(Project, pk)
                assert got is None or (got.tenant_id == world.b.id and got.name.startswith("b"))

    def test_insert_with_other_tenants_id_is_refused(self, world: World) -> None:
        with tenant_context(world.a), world.Session() as s:
            with pytest.raises(exc.ProgrammingError, match="row-level security"):
                s.execute(
                    text("insert into projects (name, tenant_id) values ('x', :t)"),
                    {"t": world.b.id},
                )
        with tenant_context(world.a), world.Session() as s:
            s.add(Project(name="forged", tenant_id=world.b.id))
            with pytest.raises(exc.ProgrammingError, match="row-level security"):
                s.flush()

    def test_update_moving_row_to_other_tenant_is_refused(self, world: World) -> None:
        with tenant_context(world.a), world.Session() as s:
            with pytest.raises(exc.ProgrammingError, match="row-level security"):
                s.execute(update(Project).values(tenant_id=world.b.id))

    def test_update_without_where_touches_only_own_rows(self, world: World) -> None:
        with tenant_context(world.a), world.Session() as s:
            result = s.execute(text("update projects set name = name || '!'"))
            assert result.rowcount == 3
            s.commit()
        with tenant_context(world.b), world.Session() as s:
            assert sorted(s.scalars(select(Project.name))) == ["b1", "b2"]

    def test_delete_without_where_deletes_only_own_rows(self, world: World) -> None:
        with tenant_context(world.a), world.Session() as s:
            assert s.execute(delete(Task)).rowcount == 3
            assert s.execute(text("delete from projects")).rowcount == 3
            s.commit()
        with tenant_context(world.b), world.Session() as s:
            assert s.scalar(select(func.count()).select_from(Project)) == 2
            assert s.scalar(select(func.count()).select_from(Task)) == 2

    def test_raw_insert_without_tenant_id_takes_the_bound_tenant(self, world: World) -> None:
        with tenant_context(world.a), world.Session() as s:
            s.execute(text("insert into projects (name) values ('raw')"))
            s.commit()
            owner = s.scalar(select(Project.tenant_id).where(Project.name == "raw"))
        assert owner == world.a.id

    def test_orm_insert_fills_tenant_id(self, world: World) -> None:
        with tenant_context(world.b), world.Session() as s:
            project = Project(name="new")
            s.add(project)
            s.commit()
            assert project.tenant_id == world.b.id

    def test_core_connection_is_bound_per_transaction(self, world: World) -> None:
        for tenant, count in ((world.a, 3), (world.b, 2), (world.a, 3)):
            with tenant_context(tenant), world.tenancy.connect() as conn:
                assert conn.execute(text("select count(*) from projects")).scalar() == count
                conn.commit()
                assert conn.execute(text("select count(*) from projects")).scalar() == count
                conn.rollback()

    def test_core_insert_for_other_tenant_is_refused(self, world: World) -> None:
        with tenant_context(world.b), world.tenancy.connect() as conn:
            with pytest.raises(exc.ProgrammingError, match="row-level security"):
                conn.execute(insert(Project).values(name="x", tenant_id=world.a.id))

    def test_one_session_switching_tenants_uses_separate_bindings(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                assert s.scalar(select(func.count()).select_from(Project)) == 3
            with tenant_context(world.b):
                assert s.scalar(select(func.count()).select_from(Project)) == 2
            with tenant_context(world.a):
                assert s.scalar(select(func.count()).select_from(Project)) == 3

    def test_identity_map_never_serves_another_tenants_object(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                project = s.scalars(select(Project).where(Project.name == "a1")).one()
                assert s.get(Project, project.id) is project
            with tenant_context(world.b):
                got = s.get(Project, project.id)
                assert got is not project
                assert got is None or got.name.startswith("b")
                assert project not in s.scalars(select(Project)).all()
            with tenant_context(world.a):
                assert s.get(Project, project.id) is project

    def test_flushing_an_object_in_another_tenants_context_is_refused(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                s.add(Project(name="added-in-a"))
            with tenant_context(world.b), pytest.raises(TenancyError, match="belongs to tenant"):
                s.flush()
            with tenant_context(world.a):
                s.commit()
                assert s.scalar(select(func.count()).select_from(Project)) == 4

    # -- an ORM object keeps its tenant ---------------------------------------------------------
    # In the schema and database placements the two tenants' rows have equal keys: each load
    # served from the wrong tenant would fill acme's object with globex's row.

    def _a1(self, s: Session, world: World) -> Project:
        with tenant_context(world.a):
            p = s.scalars(select(Project).where(Project.name == "a1")).one()
            s.commit()  # expires it
        return p

    def test_an_expired_object_reloads_from_its_own_tenant(self, world: World) -> None:
        with world.Session() as s:
            p = self._a1(s, world)
            with tenant_context(world.b):
                assert p.name == "a1"
            s.expire(p)
            assert p.name == "a1"  # no tenant active: not the default tenant's row either
            assert inspect(p).identity_token == token(world.a)

    def test_editing_after_a_read_elsewhere_writes_the_objects_own_row(self, world: World) -> None:
        with world.Session() as s:
            p = self._a1(s, world)
            with tenant_context(world.b):
                assert p.name == "a1"
            with tenant_context(world.a):
                p.name = p.name + "!"
                s.commit()
        for tenant, expected in ((world.a, ["a1!", "a2", "a3"]), (world.b, ["b1", "b2"])):
            with tenant_context(tenant), world.Session() as s:
                assert sorted(s.scalars(select(Project.name))) == expected

    def test_refresh_reads_the_objects_own_tenant(self, world: World) -> None:
        with world.Session() as s:
            p = self._a1(s, world)
            with tenant_context(world.a), world.Session() as other:
                other.execute(update(Project).where(Project.name == "a1").values(name="a1-renamed"))
                other.commit()
            with tenant_context(world.b):
                s.refresh(p)
                assert p.name == "a1-renamed"

    def test_a_deferred_column_loads_from_the_objects_own_tenant(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                p = s.scalars(select(Project).options(defer(Project.name)).where(Project.name == "a1")).one()
            with tenant_context(world.b):
                assert p.name == "a1"

    def test_a_lazy_collection_loads_from_the_objects_own_tenant(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                p = s.scalars(select(ProjectR).where(ProjectR.__table__.c.name == "a1")).one()
            with tenant_context(world.b):
                titles = [t.title for t in p.tasks]
                assert titles == ["a1-task"]
                assert {inspect(t).identity_token for t in p.tasks} == {token(world.a)}

    def test_a_lazy_many_to_one_loads_from_the_objects_own_tenant(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                t = s.scalars(select(TaskR).where(TaskR.__table__.c.title == "a1-task")).one()
                project_id = t.project_id
            with tenant_context(world.b):
                # globex's object with the same key (schema and database placements) is in the
                # identity map already: the look-up must not hand it to acme's task
                s.get(ProjectR, project_id)
                assert t.project.name == "a1"
                assert inspect(t.project).identity_token == token(world.a)

    def test_selectin_loads_follow_the_objects_own_tenant(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                p = s.scalars(select(ProjectR).where(ProjectR.__table__.c.name == "a1")).one()
                s.commit()
            with tenant_context(world.b):
                s.refresh(p)  # reloads eager_tasks with a selectin load, after the refresh
                assert [t.title for t in p.eager_tasks] == ["a1-task"]
            with tenant_context(world.a):
                result = s.scalars(select(ProjectR).options(selectinload(ProjectR.tasks)))
            with tenant_context(world.b):  # the selectin load runs as the result is read
                projects = result.all()
            assert {t.title for p in projects for t in p.tasks} == {"a1-task", "a2-task", "a3-task"}

    def test_a_second_tenants_query_never_returns_the_first_tenants_object(self, world: World) -> None:
        with world.Session() as s:
            with tenant_context(world.a):
                p = s.scalars(select(Project).where(Project.name == "a1")).one()
            with tenant_context(world.b):
                got = s.scalars(select(Project).where(Project.id == p.id)).first()
                assert got is not p
                assert got is None or got.name.startswith("b")
            assert p.name == "a1"

    def test_a_detached_object_keeps_its_tenant_in_another_session(self, world: World) -> None:
        with world.Session() as first:
            p = self._a1(first, world)
        with world.Session() as second:
            with tenant_context(world.b):
                second.add(p)
                assert p.name == "a1"

    def test_a_platform_object_is_not_reloaded_for_a_tenant(self, world: World) -> None:
        with world.Session() as s:
            with platform_context("test"):
                p = Project(name="default-platform", tenant_id=world.tenancy.get_tenant("default").id)
                s.add(p)
                s.commit()  # expires it
            with tenant_context(world.b), pytest.raises(TenancyError, match="platform_context"):
                _ = p.name

    async def test_async_loads_follow_the_objects_own_tenant(self, world: World) -> None:
        maker = world.tenancy.async_sessionmaker()
        try:
            async with maker() as s:
                with tenant_context(world.a):
                    p = (await s.scalars(select(ProjectR).where(ProjectR.__table__.c.name == "a1"))).one()
                    await s.commit()
                with tenant_context(world.b):
                    assert await p.awaitable_attrs.name == "a1"
                    assert [t.title for t in await p.awaitable_attrs.tasks] == ["a1-task"]
                    s.expire(p)
                    await s.refresh(p)
                    assert p.name == "a1"
                with tenant_context(world.a):
                    p.name = "a1-async"
                    await s.commit()
            with tenant_context(world.b):
                async with maker() as s:
                    assert sorted(await s.scalars(select(Project.name))) == ["b1", "b2"]
        finally:
            await world.tenancy.dispose_async()

    def test_nested_contexts_restore_the_outer_tenant(self, world: World) -> None:
        with world.Session() as s, tenant_context(world.a):
            with pytest.raises(RuntimeError), tenant_context(world.b):
                assert s.scalar(select(func.count()).select_from(Project)) == 2
                raise RuntimeError("boom")
            assert s.scalar(select(func.count()).select_from(Project)) == 3

    def test_default_tenant_sees_none_of_the_named_tenants_rows(self, world: World) -> None:
        with world.Session() as s:
            assert s.scalar(select(func.count()).select_from(Project)) == 0

    def test_forged_setting_inside_the_transaction_cannot_reach_an_unknown_tenant(self, world: World) -> None:
        with tenant_context(world.a), world.Session() as s:
            s.execute(text("select set_config('app.current_tenant_id', :t, true)"), {"t": str(uuid.uuid4())})
            assert s.scalar(select(func.count()).select_from(Project)) == 0

    async def test_async_session_is_isolated(self, world: World) -> None:
        maker = world.tenancy.async_sessionmaker()
        try:
            for tenant, expected in ((world.a, 3), (world.b, 2)):
                with tenant_context(tenant):
                    async with maker() as s:
                        count = await s.scalar(select(func.count()).select_from(Project))
                        assert count == expected
                        await s.execute(text("delete from projects where name like 'b%'"))
                        await s.commit()
            with tenant_context(world.b):
                async with maker() as s:
                    assert await s.scalar(select(func.count()).select_from(Project)) == 0
            with tenant_context(world.a):
                async with maker() as s:
                    assert await s.scalar(select(func.count()).select_from(Project)) == 3
        finally:
            await world.tenancy.dispose_async()


class TestSharedPlacement(IsolationSuite):
    placement = "shared"


class TestSchemaPlacement(IsolationSuite):
    placement = "schema"


class TestDatabasePlacement(IsolationSuite):
    placement = "database"
