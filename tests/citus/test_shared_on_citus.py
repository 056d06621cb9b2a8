"""The shared placement on a Citus coordinator with two workers (``Tenancy(distributed=True)``):
tables distributed by tenant and colocated, infrastructure as reference tables, the binding
reaching the workers, RLS holding there, a tenant's ORM query routed to one node, and platform
queries fanning out."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import Connection, event, func, select, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_tenancy import ConfigurationError, Tenancy, platform_context, tenant_context
from sqla_tenancy.distribution import check_distributable
from sqla_tenancy.testing.citus import CitusCluster

from .conftest import Base, Project, Task


@pytest.fixture(scope="module")
def seeded(distributed: Tenancy) -> Tenancy:
    Session = distributed.sessionmaker()
    for slug, names in (("acme", ["rocket", "anvil"]), ("globex", ["doomsday"])):
        with tenant_context(slug), Session() as session:
            projects = [Project(name=n) for n in names]
            session.add_all(projects)
            session.flush()
            session.add_all(Task(project_id=p.id, title=f"{p.name} task") for p in projects)
            session.commit()
    return distributed


def test_install_distributes_tenant_tables_colocated_and_infrastructure_as_reference(
    distributed: Tenancy,
) -> None:
    with distributed.admin_engine.connect() as conn:
        rows = conn.execute(
            text(
                "select logicalrelid::regclass::text, partmethod, "
                "column_to_column_name(logicalrelid, partkey), colocationid from pg_dist_partition "
                "where logicalrelid::regclass::text in ('projects', 'tasks', 'billing.plans')"
            )
        ).all()
    found = {name: (method, column, colocation) for name, method, column, colocation in rows}
    assert found["projects"][:2] == ("h", "tenant_id") and found["tasks"][:2] == ("h", "tenant_id")
    assert found["projects"][2] == found["tasks"][2]  # colocated: a tenant's rows on one node
    assert found["billing.plans"][0] == "n"  # reference table
    distributed.install()  # idempotent


def test_each_tenant_sees_only_its_rows_on_the_workers(seeded: Tenancy) -> None:
    Session = seeded.sessionmaker()
    for slug, expected in (("acme", ["anvil", "rocket"]), ("globex", ["doomsday"])):
        with tenant_context(slug), Session() as session:
            assert sorted(session.scalars(select(Project.name))) == expected
            raw = session.execute(text("select name from projects order by name")).scalars().all()
            assert raw == expected  # raw SQL too: RLS is evaluated on the workers
            joined = session.execute(
                text(
                    "select count(*) from tasks t "
                    "join projects p on p.tenant_id = t.tenant_id and p.id = t.project_id"
                )
            ).scalar()
            assert joined == len(expected)


def test_a_cross_tenant_write_is_refused_by_the_worker(seeded: Tenancy) -> None:
    globex = seeded.get_tenant("globex")
    Session = seeded.sessionmaker()
    with tenant_context("acme"), Session() as session:
        with pytest.raises(ProgrammingError, match="row-level security"):
            session.execute(
                text("insert into projects (tenant_id, name) values (:t, 'sneaky')"), {"t": globex.id}
            )
    with tenant_context("acme"), Session() as session:
        moved = session.execute(text("update projects set name = 'x' where tenant_id = :t"), {"t": globex.id})
        assert moved.rowcount == 0


def test_without_propagation_the_workers_see_no_tenant(seeded: Tenancy) -> None:
    """Why the binding sends citus.propagate_set_commands first: without it the setting stays on
    the coordinator, and the workers' policies see no tenant (closed, not open)."""
    acme = seeded.get_tenant("acme")
    with seeded.engine.connect() as conn:
        raw: Connection = conn
        raw.exec_driver_sql("select 1")  # a bound transaction began; end it
        raw.rollback()
    import psycopg

    url = seeded.url
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
    ) as plain:
        with plain.transaction():
            plain.execute(f"SET LOCAL app.current_tenant_id = '{acme.id}'")
            assert plain.execute("select count(*) from projects").fetchone() == (0,)


def test_the_workers_receive_the_tenant_setting_alone(seeded: Tenancy, citus: CitusCluster) -> None:
    """Citus replays on the workers the whole query string a propagated SET LOCAL came in: the
    binding's tenant setting travels alone, so the workers never run the leftover clearing,
    COMMIT; BEGIN, or the admission (whose registry exists on the coordinator only)."""
    if not citus.nodes:
        pytest.skip("an external cluster: its logs are not ours to read")
    Session = seeded.sessionmaker()
    with tenant_context("globex"), Session() as session:
        session.execute(text("select count(*) from projects /* worker-log-probe */")).scalar()
    replayed = [
        line
        for node in citus.nodes[1:]
        for line in (node.base_dir / "server.log").read_text().splitlines()  # type: ignore[operator]
        if "statement:" in line and "app.current_tenant_id" in line
    ]
    assert replayed, "the tenant setting never reached a worker"
    for line in replayed:
        sent = line[line.index("statement:") :]
        assert "admit_tenant" not in sent and "DISCARD" not in sent, sent
        assert not re.search(r";\s*COMMIT\s*;", sent), sent


def test_a_tenant_orm_query_is_routed_to_one_node(seeded: Tenancy) -> None:
    sent: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, *args: object) -> None:
        if "FROM projects" in statement:
            sent.append((statement, parameters))

    Session = seeded.sessionmaker()
    event.listen(seeded.engine, "before_cursor_execute", capture)
    try:
        with tenant_context("acme"), Session() as session:
            session.scalars(select(Project)).all()
            statement, parameters = sent[-1]
            assert "projects.tenant_id = " in statement  # the second line the session adds
            plan = "\n".join(
                row[0]
                for row in session.connection().exec_driver_sql("EXPLAIN " + statement, parameters)  # type: ignore[arg-type]
            )
    finally:
        event.remove(seeded.engine, "before_cursor_execute", capture)
    assert "Task Count: 1" in plan, plan
    with tenant_context("acme"), Session() as session:
        fanned = "\n".join(r[0] for r in session.execute(text("EXPLAIN select * from projects")))
    assert "Task Count: 1" not in fanned  # raw SQL without the filter asks every shard (RLS decides)


def test_platform_queries_fan_out_across_tenants(seeded: Tenancy) -> None:
    Session = seeded.sessionmaker()
    with platform_context("count every tenant's projects"), Session() as session:
        per_tenant = dict(
            session.execute(select(Project.tenant_id, func.count()).group_by(Project.tenant_id)).all()
        )
    ids = {seeded.get_tenant(s).id: n for s, n in (("acme", 2), ("globex", 1))}
    assert {k: v for k, v in per_tenant.items() if k in ids} == ids


async def test_async_sessions_are_bound_and_routed_the_same_way(seeded: Tenancy) -> None:
    AsyncSessionMaker = seeded.async_sessionmaker()
    for slug, expected in (("acme", ["anvil", "rocket"]), ("globex", ["doomsday"])):
        with tenant_context(slug):
            async with AsyncSessionMaker() as session:
                assert isinstance(session, AsyncSession)
                assert sorted(await session.scalars(select(Project.name))) == expected
    await seeded.dispose_async()


def test_database_tenants_are_refused_on_a_distributed_main_database(distributed: Tenancy) -> None:
    from sqla_tenancy import UnsupportedOperation

    with pytest.raises(UnsupportedOperation, match="serves shared and schema tenants"):
        distributed.create_tenant("not_database", placement="database")
    assert "not_database" not in {t.slug for t in distributed.list_tenants()}


def test_a_primary_key_without_tenant_id_is_refused_before_citus_sees_it() -> None:
    from sqlalchemy import Column, Integer, MetaData, Table

    from sqla_tenancy import tenant_id_column

    metadata = MetaData()
    Table("notes", metadata, Column("id", Integer, primary_key=True), tenant_id_column())
    with pytest.raises(ConfigurationError, match=r"notes \(primary key \('id'\)\).*PrimaryKeyConstraint"):
        check_distributable(list(metadata.sorted_tables))
    check_distributable(list(Base.metadata.sorted_tables))  # the suite's models are fine
