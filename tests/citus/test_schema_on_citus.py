"""The schema placement on a Citus coordinator with two workers: each schema tenant is a
distributed schema (schema-based sharding) placed on one node, its tables single-shard tables
there; its transactions run as its own role, which the coordinator's connections to that node
log in as; no public fallback and no other tenant's schema, enforced on the cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_tenancy import Tenancy, TenantEvent, UnsupportedOperation, tenant_context
from sqla_tenancy.testing.citus import CitusCluster
from sqla_tenancy.testing.isolation import assert_tenant_isolation

from .conftest import Project, Task

SLUGS = ("s_acme", "s_globex")


@pytest.fixture(scope="module")
def schemas(distributed: Tenancy, citus: CitusCluster) -> Iterator[Tenancy]:
    """Two schema tenants on the distributed Tenancy, each with a project and a task; their
    roles authorized between the nodes by an ``after_create`` hook, as an operator would."""

    def authorize(event: TenantEvent) -> None:
        assert event.tenant is not None
        if event.tenant.placement == "schema":
            for role, password in distributed.node_logins(event.tenant):
                citus.authorize(role, password)

    distributed.on("after_create", authorize)
    for role, password in distributed.node_logins():  # the shared placement's anonymous role
        citus.authorize(role, password)
    Session = distributed.sessionmaker()
    for slug in SLUGS:
        distributed.create_tenant(slug, placement="schema")
        with tenant_context(slug), Session() as session:
            project = Project(name=f"{slug} project")
            session.add(project)
            session.flush()
            session.add(Task(project_id=project.id, title=f"{slug} task"))
            session.commit()
    yield distributed
    for slug in SLUGS:
        if slug in {t.slug for t in distributed.list_tenants()}:
            distributed.delete_tenant(slug)


def on_workers(tenancy: Tenancy, sql: str) -> list[str]:
    with tenancy.admin_engine.connect() as conn:
        rows = conn.execute(text("select result from run_command_on_workers(:sql)"), {"sql": sql})
        return [str(r) for r in rows.scalars()]


def test_each_schema_tenant_is_a_distributed_schema_on_one_node(schemas: Tenancy) -> None:
    with schemas.admin_engine.connect() as conn:
        placed = dict(
            conn.execute(
                text(
                    "select schema_name::text, colocation_id from citus_schemas "
                    "where schema_name::text = any(:s)"
                ),
                {"s": [schemas.get_tenant(s).location["schema"] for s in SLUGS]},
            ).all()
        )
        tables = conn.execute(
            text(
                "select table_name::text, citus_table_type from citus_tables "
                "where table_name::text like any(:patterns) order by 1"
            ),
            {"patterns": [f"{schemas.get_tenant(s).location['schema']}.%" for s in SLUGS]},
        ).all()
    assert len(placed) == 2 and len(set(placed.values())) == 2  # one colocation group per tenant
    assert {kind for _, kind in tables} == {"schema"}
    assert {name.split(".")[1] for name, _ in tables} >= {"projects", "tasks"}


def test_each_schema_tenant_sees_only_its_own_rows(schemas: Tenancy) -> None:
    Session = schemas.sessionmaker()
    for slug in SLUGS:
        with tenant_context(slug), Session() as session:
            assert session.scalars(select(Project.name)).all() == [f"{slug} project"]
            raw = session.execute(text("select t.title from tasks t join projects p on p.id = t.project_id"))
            assert raw.scalars().all() == [f"{slug} task"]
            role = session.execute(text("select current_user")).scalar()
            assert role == schemas.placement("schema").names(slug)[1]  # type: ignore[attr-defined]


def test_another_tenants_schema_and_the_public_tables_are_out_of_reach(schemas: Tenancy) -> None:
    other = schemas.get_tenant("s_globex").location["schema"]
    with tenant_context("s_acme"), schemas.connect() as conn:
        with pytest.raises(ProgrammingError, match="permission denied for schema"):
            conn.execute(text(f'select * from "{other}".projects'))
    with tenant_context("s_acme"), schemas.connect() as conn:
        with pytest.raises(ProgrammingError, match="permission denied"):
            conn.execute(text("select * from public.projects"))  # the shared tenants' table
    with tenant_context("s_acme"), schemas.connect() as conn:
        path = conn.execute(text("show search_path")).scalar()
        assert path == f'"{schemas.get_tenant("s_acme").location["schema"]}", pg_temp'


async def test_async_schema_sessions_are_bound_the_same_way(schemas: Tenancy) -> None:
    Maker = schemas.async_sessionmaker()
    for slug in SLUGS:
        with tenant_context(slug):
            async with Maker() as session:
                assert isinstance(session, AsyncSession)
                assert (await session.scalars(select(Project.name))).all() == [f"{slug} project"]
    await schemas.dispose_async()


@pytest.fixture(scope="module")
def anon_shared(schemas: Tenancy) -> Iterator[str]:
    """A shared tenant of this module's own (the shared suite's keep their rows as seeded)."""
    schemas.create_tenant("anon_shared")
    yield "anon_shared"
    schemas.delete_tenant("anon_shared")


@pytest.mark.parametrize("slug", ["anon_shared", "s_acme"])  # a shared tenant, a schema tenant
def test_anonymous_requests_read_the_opted_in_tables_only(
    schemas: Tenancy, anon_shared: str, slug: str
) -> None:
    """The anonymous suite's points on the cluster: the opted-in table shows the tenant's rows
    only, another table and every write are permission denied, the role lasts one transaction."""
    Session = schemas.sessionmaker()
    with tenant_context(slug), Session() as session:
        session.add(Project(name=f"{slug} public project"))
        session.commit()
        own = sorted(session.scalars(select(Project.name)))
    with tenant_context(slug, anonymous=True), Session() as session:
        assert sorted(session.scalars(select(Project.name))) == own
        assert sorted(session.execute(text("select name from projects")).scalars()) == own
    with tenant_context(slug, anonymous=True), Session() as session:
        with pytest.raises(ProgrammingError, match="permission denied"):
            session.execute(text("select * from tasks"))
    with tenant_context(slug, anonymous=True), Session() as session:
        with pytest.raises(ProgrammingError, match="permission denied"):
            session.execute(text("insert into projects (name) values ('anonymous write')"))
    with tenant_context(slug), Session() as session:  # the next transaction has its full role again
        assert session.execute(text("select count(*) from tasks")).scalar() is not None


async def test_anonymous_async_sessions_on_citus(schemas: Tenancy, anon_shared: str) -> None:
    Maker = schemas.async_sessionmaker()
    for slug in (anon_shared, "s_acme"):
        with tenant_context(slug):
            async with Maker() as session:
                own = sorted((await session.scalars(select(Project.name))).all())
        with tenant_context(slug, anonymous=True):
            async with Maker() as session:
                names = sorted((await session.scalars(select(Project.name))).all())
                with pytest.raises(ProgrammingError, match="permission denied"):
                    await session.execute(text("select * from tasks"))
        assert names == own
    await schemas.dispose_async()


def test_anonymous_requests_need_a_secret_key_on_citus(schemas: Tenancy) -> None:
    keyless = Tenancy(
        schemas.url,
        admin_url=schemas.admin_url,
        metadata=schemas.metadata,
        infrastructure_schemas=schemas.infrastructure_schemas,
        name_prefix=schemas.name_prefix,
        distributed=True,
        registry_listen=False,
    )
    try:
        with tenant_context("acme", anonymous=True), keyless.sessionmaker()() as session:
            with pytest.raises(UnsupportedOperation, match="need a secret_key"):
                session.execute(select(Project))
    finally:
        keyless.dispose()


def test_deleting_a_schema_tenant_removes_it_from_every_node(schemas: Tenancy, citus: CitusCluster) -> None:
    schemas.create_tenant("s_initech", placement="schema")
    tenant = schemas.get_tenant("s_initech")
    schema, role = tenant.location["schema"], tenant.location["role"]
    assert on_workers(schemas, f"select count(*) from pg_roles where rolname = '{role}'") == ["1", "1"]
    schemas.delete_tenant("s_initech")
    assert on_workers(schemas, f"select count(*) from pg_roles where rolname = '{role}'") == ["0", "0"]
    assert on_workers(schemas, f"select count(*) from pg_namespace where nspname = '{schema}'") == ["0", "0"]
    with schemas.admin_engine.connect() as conn:
        assert (
            conn.execute(
                text("select count(*) from citus_schemas where schema_name::text = :s"), {"s": schema}
            ).scalar()
            == 0
        )


@pytest.mark.parametrize("placement", ["shared", "schema"])
def test_the_isolation_checker_finds_nothing_on_the_cluster(schemas: Tenancy, placement: str) -> None:
    """The checker of users' CI (sqla_tenancy.testing.isolation), run on Citus: every attack of it
    (ORM, Core and raw SQL reads, writes, keys, pooled connections, no tenant, the catalog) for
    both placements, through the coordinator."""
    report = assert_tenant_isolation(schemas, placements=[placement])
    assert report.placements == [placement] and report.findings == []
    assert report.checks >= 60
    # (a schema tenant's own parent row holds the other's key values: that probe needs none)
    assert all("not probed" in skipped for skipped in report.skipped), report.skipped


def test_a_schema_tenants_node_and_a_move_under_load(schemas: Tenancy, citus: CitusCluster) -> None:
    """tenant_node() of a schema tenant is its distributed schema's node; move_tenant_node() moves
    the schema whole (citus_schema_move) while it and a neighbour write: no leak, no lost write."""
    from .test_nodes_on_citus import Writer, workers

    if not citus.nodes:
        pytest.skip("an external cluster: its nodes are not ours to move shards between")
    schemas.create_tenant("s_mover", placement="schema")
    try:
        before = schemas.tenant_node("s_mover")
        with schemas.admin_engine.connect() as conn:
            where = (
                conn.execute(
                    text(
                        "select distinct nodename || ':' || nodeport from citus_shards "
                        "where table_name::text like :pattern"
                    ),
                    {"pattern": f"{schemas.get_tenant('s_mover').location['schema']}.%"},
                )
                .scalars()
                .all()
            )
        assert where == [before.address] and before.isolated
        neighbour = schemas.tenant_node("s_acme")
        target = next(w for w in workers(citus) if w != before.address)
        writers = [Writer(schemas, "s_mover"), Writer(schemas, "s_acme")]
        for writer in writers:
            writer.start()
        time.sleep(0.5)
        moved = schemas.move_tenant_node("s_mover", target)
        moved_at = {w.slug: len(w.committed) for w in writers}
        time.sleep(0.5)
        for writer in writers:
            writer.stop.set()
        for writer in writers:
            writer.join(30)
        assert moved.address == target == schemas.tenant_node("s_mover").address
        assert schemas.tenant_node("s_acme").address == neighbour.address
        for writer in writers:
            assert writer.leaks == [], writer.leaks
            assert len(writer.committed) > moved_at[writer.slug] > 0
            with tenant_context(writer.slug), schemas.sessionmaker()() as session:
                present = set(
                    session.scalars(select(Project.id).where(Project.name.like(f"{writer.slug}-load-%")))
                )
            assert set(writer.committed) <= present  # no committed write lost
        assert schemas.move_tenant_node("s_mover", moved.node_id) == moved  # already there
    finally:
        schemas.delete_tenant("s_mover")
