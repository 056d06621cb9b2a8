"""Nothing a tenant's transaction leaves on a pooled connection reaches the next tenant.

The application engine has one connection (``pool_size=1``), so every transaction below runs on
the same PostgreSQL backend (each test checks the backend pid, else it would prove nothing). A
first *actor* (a tenant, fully or anonymously) commits a transaction that leaves session-level
state behind, the way application code or a tutorial would; the next actor, on the same backend,
must find none of it: not the settings that decide where names resolve and as whom, not a
temporary table, a holdable cursor, a ``LISTEN`` or a session advisory lock. A database tenant's
pool serves that tenant alone, but its full and anonymous transactions share it: the same holds
between them.

Every pair runs with sync and async sessions.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import exc, text
from sqlalchemy.util import greenlet_spawn

from sqla_tenancy import Tenancy, Tenant, platform_context, tenant_context
from sqla_tenancy.identifiers import quote_ident
from sqla_tenancy.testing import TestServer

from .conftest import SECRET
from .models import INFRASTRUCTURE, Base, Project


@dataclass(frozen=True)
class Actor:
    """A tenant, served fully or anonymously, and what its transactions must find bound."""

    slug: str
    anonymous: bool = False

    @property
    def name(self) -> str:
        return f"{self.slug}{' (anonymous)' if self.anonymous else ''}"


@dataclass
class World:
    tenancy: Tenancy
    server: TestServer
    database: str
    tenants: dict[str, Tenant]

    def placement(self, actor: Actor) -> str:
        return self.tenants[actor.slug].strategy

    def expected_user(self, actor: Actor) -> str:
        prefix, placement = self.tenancy.name_prefix, self.placement(actor)
        if placement == "shared":
            return f"{prefix}_anonymous" if actor.anonymous else self.server.app_role
        return f"{prefix}_{actor.slug}_{'anon' if actor.anonymous else 'app'}"

    def expected_schema(self, actor: Actor) -> str:
        if self.placement(actor) == "schema":
            return f"{self.tenancy.name_prefix}_{actor.slug}"
        return "public"

    def table(self, actor: Actor) -> str:
        """Where the actor's projects live, as the admin role names them."""
        return f"{quote_ident(self.expected_schema(actor))}.projects"


SHARED, SHARED_2, SCHEMA, SCHEMA_2, DATABASE = "alpha", "bravo", "charlie", "delta", "echo"

#: (first, next): the first leaves something on the connection, the next must not find it.
PAIRS = [
    (Actor(SCHEMA), Actor(SHARED)),
    (Actor(SHARED), Actor(SCHEMA)),
    (Actor(SCHEMA), Actor(SCHEMA_2)),
    (Actor(SHARED), Actor(SHARED_2)),
    (Actor(SHARED), Actor(SHARED, anonymous=True)),
    (Actor(SCHEMA), Actor(SCHEMA, anonymous=True)),
    (Actor(DATABASE), Actor(DATABASE, anonymous=True)),
]
PAIR_IDS = [f"{a.name}->{b.name}" for a, b in PAIRS]


@pytest.fixture(scope="module")
def world(tenancy_server: TestServer) -> Iterator[World]:
    database = tenancy_server.create_database()
    tenancy = Tenancy(
        tenancy_server.url(database),
        metadata=Base.metadata,
        admin_url=tenancy_server.url(database, role="admin"),
        infrastructure_schemas=INFRASTRUCTURE,
        name_prefix=tenancy_server.name_prefix(database),
        secret_key=SECRET,
        engine_options={"pool_size": 1, "max_overflow": 0},
        tenant_pool_size=1,
        tenant_max_overflow=0,
    )
    try:
        tenancy.install()
        tenancy.prepare_server(tenancy_server.superuser_url)
        tenants = {
            slug: tenancy.create_tenant(slug, placement=placement)
            for slug, placement in (
                (SHARED, "shared"),
                (SHARED_2, "shared"),
                (SCHEMA, "schema"),
                (SCHEMA_2, "schema"),
                (DATABASE, "database"),
            )
        }
        maker = tenancy.sessionmaker()
        for slug in tenants:
            with tenant_context(slug), maker() as s:
                s.add_all([Project(name=f"{slug}-1"), Project(name=f"{slug}-2")])
                s.commit()
        yield World(tenancy, tenancy_server, database, tenants)
    finally:
        tenancy.dispose()
        tenancy_server.drop_database(database)


class Runner:
    """Runs one transaction of an actor, in a sync or an async session, and returns each
    statement's rows (``None`` for statements that return none)."""

    def __init__(self, world: World, mode: str) -> None:
        self.world = world
        self.mode = mode

    async def __call__(self, actor: Actor, statements: Sequence[str], *, commit: bool = True) -> list[Any]:
        with tenant_context(actor.slug, anonymous=actor.anonymous):
            if self.mode == "sync":
                with self.world.tenancy.sessionmaker()() as s:
                    out = [_rows(s.execute(text(sql))) for sql in statements]
                    s.commit() if commit else s.rollback()
                    return out
            async with self.world.tenancy.async_sessionmaker()() as s:
                out = [_rows(await s.execute(text(sql))) for sql in statements]
                await (s.commit() if commit else s.rollback())
                return out


def _rows(result: Any) -> list[tuple[Any, ...]] | None:
    return [tuple(r) for r in result] if result.returns_rows else None


@pytest_asyncio.fixture(params=["sync", "async"])
async def run(request: pytest.FixtureRequest, world: World) -> AsyncIterator[Runner]:
    yield Runner(world, request.param)
    # Async pools belong to this test's event loop: close them before the loop goes.
    await greenlet_spawn(world.tenancy.tenant_engines.clear)
    await world.tenancy.async_engine.dispose()


PID = "select pg_backend_pid()"


async def leave(run: Runner, actor: Actor, statements: Sequence[str]) -> int:
    """Run ``statements`` as ``actor`` and commit; returns the backend pid."""
    out = await run(actor, [PID, *statements])
    return int(out[0][0][0])


async def same_backend(run: Runner, actor: Actor, pid: int, statements: Sequence[str]) -> list[Any]:
    out = await run(actor, [PID, *statements])
    assert out[0][0][0] == pid, "the next transaction did not reuse the backend: the test proves nothing"
    return out[1:]


def session_role_for(world: World, first: Actor) -> str:
    """A role the first actor's session may ``SET ROLE`` to: a schema tenant's role (the
    application role is a member of each), or a database tenant's anonymous role."""
    prefix = world.tenancy.name_prefix
    if world.placement(first) == "database":
        return f"{prefix}_{first.slug}_anon"
    return f"{prefix}_{SCHEMA}_app"


@pytest.mark.parametrize(("first", "next_"), PAIRS, ids=PAIR_IDS)
class TestLeftovers:
    async def test_session_level_settings_do_not_outlive_the_transaction(
        self, world: World, run: Runner, first: Actor, next_: Actor
    ) -> None:
        """``SET search_path``, ``SET ROLE`` and ``SET app.current_tenant_id`` without ``LOCAL``
        (a common tutorial pattern) are pinned back by the next binding, whatever placement set
        them: the next actor's insert lands in its own table, as its own role."""
        tenant_id = world.tenants[first.slug].id
        pid = await leave(
            run,
            first,
            [
                f"SET search_path TO {quote_ident(world.expected_schema(first))}, public",
                f"SET ROLE {quote_ident(session_role_for(world, first))}",
                f"SET app.current_tenant_id = '{tenant_id}'",
            ],
        )
        name = f"{next_.slug}-landed-{uuid.uuid4().hex[:8]}"
        probe = "select current_user::text, current_schema()::text, current_setting('app.current_tenant_id')"
        statements = [probe]
        if not next_.anonymous:
            statements.append(f"insert into projects (name) values ('{name}')")
        (bound, *_) = await same_backend(run, next_, pid, statements)
        assert bound == [
            (world.expected_user(next_), world.expected_schema(next_), str(world.tenants[next_.slug].id))
        ]
        if next_.anonymous or world.placement(next_) == "database":
            return
        with world.tenancy.admin_engine.connect() as admin:
            here = admin.execute(
                text(f"select tenant_id from {world.table(next_)} where name = :n"), {"n": name}
            )
            assert here.scalars().all() == [world.tenants[next_.slug].id]
            if world.table(first) != world.table(next_):
                there = admin.execute(
                    text(f"select count(*) from {world.table(first)} where name = :n"), {"n": name}
                )
                assert there.scalar() == 0

    async def test_temporary_tables_are_refused_by_default(
        self, world: World, run: Runner, first: Actor, next_: Actor
    ) -> None:
        """install() (main database) and provisioning (tenant databases) leave no TEMPORARY
        privilege: a tenant cannot plant a temporary table at all."""
        with pytest.raises(exc.ProgrammingError, match="permission denied"):
            await run(first, ["create temporary table planted (x int)"])

    async def test_a_temporary_table_left_behind_is_gone(
        self, world: World, run: Runner, first: Actor, next_: Actor, temporary_allowed: None
    ) -> None:
        pid = await leave(run, first, ["create temporary table leftover as select name from projects"])
        with pytest.raises(exc.ProgrammingError, match="does not exist"):
            await same_backend(run, next_, pid, ["select * from leftover"])

    async def test_a_temporary_table_cannot_shadow_the_next_tenants_table(
        self, world: World, run: Runner, first: Actor, next_: Actor, temporary_allowed: None
    ) -> None:
        """Unless placed explicitly, ``pg_temp`` is searched first: a ``pg_temp.projects`` would
        hide the next tenant's own ``projects``."""
        pid = await leave(
            run,
            first,
            [
                "create temporary table projects (id int, name text, tenant_id uuid)",
                "insert into pg_temp.projects (id, name) values (1, 'planted')",
            ],
        )
        (names,) = await same_backend(run, next_, pid, ["select name from projects order by name"])
        assert {(f"{next_.slug}-1",), (f"{next_.slug}-2",)} <= set(names)
        assert all(name.startswith(f"{next_.slug}-") for (name,) in names), names

    async def test_a_holdable_cursor_is_closed(
        self, world: World, run: Runner, first: Actor, next_: Actor
    ) -> None:
        pid = await leave(run, first, ["declare leak cursor with hold for select name from projects"])
        with pytest.raises(exc.DBAPIError, match="does not exist"):
            await same_backend(run, next_, pid, ["fetch all from leak"])

    async def test_listen_does_not_outlive_its_tenant(
        self, world: World, run: Runner, first: Actor, next_: Actor
    ) -> None:
        pid = await leave(run, first, ["listen tenancy_leak"])
        (channels,) = await same_backend(run, next_, pid, ["select pg_listening_channels()"])
        assert channels == []

    async def test_session_advisory_locks_are_released(
        self, world: World, run: Runner, first: Actor, next_: Actor
    ) -> None:
        pid = await leave(run, first, ["select pg_advisory_lock(4242)"])
        (held,) = await same_backend(
            run,
            next_,
            pid,
            # the lock left behind (the transaction itself holds its tenant's serving lock)
            [
                "select count(*) from pg_locks where locktype = 'advisory' "
                "and classid = 0 and objid = 4242 and pid = pg_backend_pid()"
            ],
        )
        assert held == [(0,)]

    async def test_a_rolled_back_transaction_does_not_bring_leftovers_back(
        self, world: World, run: Runner, first: Actor, next_: Actor, temporary_allowed: None
    ) -> None:
        """Clearing happens inside the next transaction: when that one rolls back, what it dropped
        comes back, and the transaction after it must clear it again."""
        pid = await leave(
            run,
            first,
            ["create temporary table leftover as select name from projects", "listen tenancy_leak"],
        )
        await run(next_, [PID, "select 1"], commit=False)
        (channels,) = await same_backend(run, next_, pid, ["select pg_listening_channels()"])
        assert channels == []
        with pytest.raises(exc.ProgrammingError, match="does not exist"):
            await same_backend(run, next_, pid, ["select * from leftover"])


def test_unbound_work_on_the_application_engine_is_cleared_before_the_next_tenant(
    world: World, temporary: None
) -> None:
    """A transaction nobody bound (platform work on the application engine) may leave anything:
    the tenant that used the connection before it finds none of it either."""
    engine = world.tenancy.engine
    with tenant_context(SHARED), engine.connect() as conn:
        pid = conn.execute(text(PID)).scalar()
        conn.commit()
    with platform_context("maintenance"), engine.connect() as conn:
        assert conn.execute(text(PID)).scalar() == pid
        conn.execute(text("create temporary table leftover (x int)"))
        conn.execute(text("declare leak cursor with hold for select 1"))
        conn.commit()
    with tenant_context(SHARED), engine.connect() as conn:
        assert conn.execute(text(PID)).scalar() == pid
        assert conn.execute(text("select to_regclass('pg_temp.leftover')")).scalar() is None
        with pytest.raises(exc.DBAPIError, match="does not exist"):
            conn.execute(text("fetch all from leak"))


@pytest.fixture
def temporary(world: World) -> Iterator[None]:
    world.server.execute(f"GRANT TEMPORARY ON DATABASE {quote_ident(world.database)} TO PUBLIC")
    try:
        yield
    finally:
        world.server.execute(f"REVOKE TEMPORARY ON DATABASE {quote_ident(world.database)} FROM PUBLIC")


@pytest.fixture
def temporary_allowed(world: World, first: Actor) -> Iterator[None]:
    """As on a database whose owner kept (or gave back) ``TEMPORARY`` for ``PUBLIC``."""
    in_its_own = world.placement(first) == "database"
    database = f"{world.tenancy.name_prefix}_{first.slug}" if in_its_own else world.database
    world.server.execute(f"GRANT TEMPORARY ON DATABASE {quote_ident(database)} TO PUBLIC")
    try:
        yield
    finally:
        world.server.execute(f"REVOKE TEMPORARY ON DATABASE {quote_ident(database)} FROM PUBLIC")


def test_a_tenant_cannot_connect_to_the_main_database_after_install(world: World) -> None:
    """install() takes CONNECT on the main database from PUBLIC: only the roles that need it
    (the application role, the admin role, the tenants' group) keep it."""
    with world.tenancy.admin_engine.connect() as admin:
        public = admin.execute(
            text(
                "select has_database_privilege('public', current_database(), 'CONNECT'), "
                "has_database_privilege('public', current_database(), 'TEMPORARY'), "
                "has_database_privilege(:app, current_database(), 'CONNECT')"
            ),
            {"app": world.server.app_role},
        ).one()
    assert tuple(public) == (False, False, True)
