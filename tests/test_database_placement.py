"""What only the database placement has: the FDW architecture, its security, provisioning journal,
foreign-schema refresh, the engine cache and placement on another server."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import create_engine, exc, func, select, text
from sqlalchemy.engine import URL

from sqla_tenancy import ProvisioningError, Tenancy, tenant_context
from sqla_tenancy.placements.database import derive_password
from sqla_tenancy.rls import fdw_role_name
from sqla_tenancy.testing import TemporaryCluster, TestServer

from .conftest import SECRET
from .models import INFRASTRUCTURE, Base, Project, Task, User


@pytest.fixture
def dbt(tenancy: Tenancy, tenancy_server: TestServer) -> Iterator[Tenancy]:
    tenancy.prepare_server(tenancy_server.superuser_url)
    for slug in ("acme", "globex"):
        tenancy.create_tenant(slug, placement="database")
        with tenant_context(slug), tenancy.sessionmaker()() as s:
            project = Project(name=f"{slug}-p")
            s.add(project)
            s.flush()
            s.add_all([Task(project_id=project.id, title=f"{slug}-t"), User(email=f"x@{slug}.test")])
            s.commit()
    yield tenancy


def database_tenants(
    factory: Callable[..., Tenancy], server: TestServer, slugs: tuple[str, ...], **options: object
) -> Tenancy:
    """A Tenancy with its own options, installed, prepared, with a database tenant per slug."""
    t = factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE, secret_key=SECRET, **options)
    t.install()
    t.prepare_server(server.superuser_url)
    for slug in slugs:
        t.create_tenant(slug, placement="database")
    return t


def catalog(t: Tenancy) -> dict[str, set[str]]:
    with t.admin_engine.connect() as conn:
        return {
            "databases": set(conn.execute(text("select datname from pg_database")).scalars()),
            "roles": set(conn.execute(text("select rolname from pg_roles")).scalars()),
            "tenants": set(conn.execute(text("select slug from tenancy.tenants")).scalars()),
        }


def psycopg_kwargs(url: URL, *, user: str, password: str, dbname: str) -> dict[str, object]:
    return {"host": url.host, "port": url.port, "user": user, "password": password, "dbname": dbname}


def test_fdw_role_cannot_choose_its_tenant(dbt: Tenancy) -> None:
    acme, globex = dbt.get_tenant("acme"), dbt.get_tenant("globex")
    role = fdw_role_name(acme.id, dbt.name_prefix)
    kwargs = psycopg_kwargs(
        dbt.url, user=role, password=derive_password(SECRET.encode(), role), dbname=dbt.url.database or ""
    )
    with psycopg.connect(**kwargs) as conn:  # type: ignore[arg-type]
        conn.execute(f"set app.current_tenant_id = '{globex.id}'")
        assert conn.execute("select email from auth.users").fetchall() == [("x@acme.test",)]
        conn.execute("select set_config('app.current_tenant_id', %s, false)", (str(globex.id),))
        assert conn.execute("select count(*) from auth.users").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("insert into auth.users (email, tenant_id) values ('evil', %s)", (globex.id,))
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select * from tenancy.tenants")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select * from public.projects")


def test_fdw_role_is_nobypassrls_and_not_superuser(dbt: Tenancy) -> None:
    role = fdw_role_name(dbt.get_tenant("acme").id, dbt.name_prefix)
    with dbt.admin_engine.connect() as conn:
        row = conn.execute(
            text("select rolsuper, rolbypassrls, rolcanlogin from pg_roles where rolname = :r"), {"r": role}
        ).one()
    assert tuple(row) == (False, False, True)


def test_infrastructure_through_foreign_tables(dbt: Tenancy) -> None:
    acme = dbt.get_tenant("acme")
    with tenant_context("acme"), dbt.sessionmaker()() as s:
        user = s.scalars(select(User)).one()
        assert (user.email, user.tenant_id) == ("x@acme.test", acme.id)
        new = User(email="second@acme.test")
        s.add(new)
        s.flush()
        assert new.id is not None and new.id != user.id
        # remote defaults: the sequence (main-side trigger) and now() (copied onto the foreign table)
        s.refresh(new)
        assert new.created_at is not None and new.tenant_id == acme.id
        s.commit()
        # one query joining a tenant table and an infrastructure table
        rows = s.execute(
            text(
                "select p.name, u.email from projects p join auth.users u on u.tenant_id = p.tenant_id "
                "order by u.email"
            )
        ).all()
        assert rows == [("acme-p", "second@acme.test"), ("acme-p", "x@acme.test")]
    with dbt.admin_engine.connect() as conn:  # the rows live in the main database
        assert (
            conn.execute(
                text("select count(*) from auth.users where tenant_id = :t"), {"t": acme.id}
            ).scalar()
            == 2
        )


def test_a_transaction_over_both_databases_is_atomic(dbt: Tenancy) -> None:
    with tenant_context("acme"), dbt.sessionmaker()() as s:
        s.add_all([Project(name="rolled-back"), User(email="rolled@back.test")])
        s.flush()
        s.rollback()
        s.add_all([Project(name="kept"), User(email="kept@acme.test")])
        s.commit()
    with tenant_context("acme"), dbt.sessionmaker()() as s:
        assert sorted(s.scalars(select(Project.name))) == ["acme-p", "kept"]
        assert sorted(s.scalars(select(User.email))) == ["kept@acme.test", "x@acme.test"]


def test_where_clauses_are_pushed_down(dbt: Tenancy) -> None:
    with tenant_context("acme"), dbt.connect() as conn:
        plan = "\n".join(
            conn.execute(
                text("explain verbose select id from auth.users where email = 'x@acme.test'")
            ).scalars()
        )
    assert "Foreign Scan" in plan
    remote = next(line for line in plan.splitlines() if "Remote SQL" in line)
    assert "WHERE" in remote and "x@acme.test" in remote


def test_tenant_role_cannot_connect_to_another_tenants_database(dbt: Tenancy) -> None:
    acme_role = f"{dbt.name_prefix}_acme_app"
    kwargs = psycopg_kwargs(
        dbt.url,
        user=acme_role,
        password=derive_password(SECRET.encode(), acme_role),
        dbname=f"{dbt.name_prefix}_globex",
    )
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(**kwargs)  # type: ignore[arg-type]
    kwargs["dbname"] = dbt.url.database or ""
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(**kwargs)  # type: ignore[arg-type]


def test_tenant_role_opens_its_own_database_and_no_maintenance_database(
    tenancy: Tenancy, tenancy_server: TestServer, maintenance_databases_open: None
) -> None:
    tenancy.prepare_server(tenancy_server.superuser_url)  # restricts them by default
    tenancy.create_tenant("acme", placement="database")
    dbt = tenancy
    role = f"{dbt.name_prefix}_acme_app"
    password = derive_password(SECRET.encode(), role)
    for database in ("postgres", "template1", dbt.url.database or ""):
        kwargs = psycopg_kwargs(dbt.url, user=role, password=password, dbname=database)
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(**kwargs)  # type: ignore[arg-type]
    own = f"{dbt.name_prefix}_acme"
    with psycopg.connect(**psycopg_kwargs(dbt.url, user=role, password=password, dbname=own)) as conn:  # type: ignore[arg-type]
        assert conn.execute("select current_database()").fetchone() == (own,)


@pytest.fixture
def maintenance_databases_open(tenancy_server: TestServer) -> Iterator[None]:
    """``postgres`` and ``template1`` as ``initdb`` leaves them, open to ``PUBLIC``; as they were
    afterwards (the test server is shared by the whole run)."""
    databases = ("postgres", "template1")
    with tenancy_server.superuser.connect() as conn:
        held = {
            d: conn.execute(text("select has_database_privilege('public', :d, 'CONNECT')"), {"d": d}).scalar()
            for d in databases
        }
    for database in databases:
        tenancy_server.execute(f'grant connect, temporary on database "{database}" to public')
    yield
    for database in databases:
        if held[database]:
            tenancy_server.execute(f'grant connect, temporary on database "{database}" to public')
        else:
            tenancy_server.execute(f'revoke connect, temporary on database "{database}" from public')


def test_declining_the_maintenance_restriction_is_reported_at_provisioning(
    tenancy: Tenancy,
    tenancy_server: TestServer,
    maintenance_databases_open: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tenancy.prepare_server(tenancy_server.superuser_url, restrict_maintenance_databases=False)
    role = f"{tenancy.name_prefix}_acme_app"
    with caplog.at_level(logging.WARNING, logger="sqla_tenancy"):
        tenancy.create_tenant("acme", placement="database")
    [warning] = [r.getMessage() for r in caplog.records if role in r.getMessage()]
    assert "postgres" in warning and "template1" in warning
    assert tenancy.url.database not in warning  # install() closed the main database
    assert 'REVOKE CONNECT, TEMPORARY ON DATABASE "postgres" FROM PUBLIC' in warning
    kwargs = psycopg_kwargs(
        tenancy.url, user=role, password=derive_password(SECRET.encode(), role), dbname="postgres"
    )
    psycopg.connect(**kwargs).close()  # type: ignore[arg-type]  # what the warning is about


def test_no_plaintext_password_in_registry_or_logs(
    tenancy: Tenancy, tenancy_server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    tenancy.prepare_server(tenancy_server.superuser_url)
    with caplog.at_level(logging.DEBUG):
        acme = tenancy.create_tenant("acme", placement="database")
    secrets = [
        derive_password(SECRET.encode(), r)
        for r in (f"{tenancy.name_prefix}_acme_app", fdw_role_name(acme.id, tenancy.name_prefix))
    ]
    with tenancy.admin_engine.connect() as conn:
        row = conn.execute(text("select t::text from tenancy.tenants t where slug = 'acme'")).scalar()
    for secret in secrets:
        assert secret not in (row or "")
        assert secret not in caplog.text


STEPS = ["register", "template", "app_role", "database", "rename_database", "fdw_role", "fdw", "activate"]


def template_oid(t: Tenancy) -> int:
    with t.admin_engine.connect() as conn:
        oid = conn.execute(
            text("select oid::int from pg_database where datname = :d"), {"d": f"{t.name_prefix}_template"}
        ).scalar()
    assert isinstance(oid, int)
    return oid


def test_all_steps_are_exercised(tenancy: Tenancy, tenancy_server: TestServer) -> None:
    tenancy.prepare_server(tenancy_server.superuser_url)
    seen: list[str] = []
    tenancy._fault_injector = seen.append
    tenancy.create_tenant("acme", placement="database")
    assert seen == STEPS


@pytest.mark.parametrize("step", STEPS)
def test_failure_at_any_step_leaves_nothing(tenancy: Tenancy, tenancy_server: TestServer, step: str) -> None:
    tenancy.prepare_server(tenancy_server.superuser_url)

    def inject(name: str) -> None:
        if name == step:
            raise RuntimeError(f"injected failure at {name}")

    before, template = catalog(tenancy), template_oid(tenancy)
    tenancy._fault_injector = inject
    with pytest.raises((ProvisioningError, RuntimeError), match="injected") as raised:
        tenancy.create_tenant("acme", placement="database")
    if isinstance(raised.value, ProvisioningError):  # it names the step it stopped at
        assert f"failed at step {step!r} (RuntimeError: injected" in str(raised.value)
    assert catalog(tenancy) == before
    assert template_oid(tenancy) == template  # the clean-up never touches the template
    tenancy._fault_injector = None
    tenancy.create_tenant("acme", placement="database")
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        assert s.scalars(select(Project)).all() == []
    tenancy.create_tenant("globex", placement="database")  # and the server serves the next one


def test_retry_cleans_up_after_a_crashed_attempt(tenancy: Tenancy, tenancy_server: TestServer) -> None:
    tenancy.prepare_server(tenancy_server.superuser_url)
    before = catalog(tenancy)

    def crash(name: str) -> None:
        if name == "fdw":
            raise KeyboardInterrupt  # not an Exception: like a process being stopped

    tenancy._fault_injector = crash
    with pytest.raises(KeyboardInterrupt):
        tenancy.create_tenant("acme", placement="database")
    assert catalog(tenancy) == before  # BaseException still runs the clean-up
    tenancy._fault_injector = None
    tenancy.create_tenant("acme", placement="database")
    assert catalog(tenancy)["databases"] - before["databases"] == {f"{tenancy.name_prefix}_acme"}
    # (killed processes: tests/test_provisioning_safety.py)


def test_a_crashed_attempt_without_a_journal_drops_nothing(
    tenancy: Tenancy, tenancy_server: TestServer
) -> None:
    """A ``provisioning`` row without a journal (as an interrupted attempt of an earlier version
    leaves) says nothing about what exists under the tenant's names: the retry removes the row,
    and refuses the database it cannot prove is the tenant's instead of dropping it."""
    tenancy.prepare_server(tenancy_server.superuser_url)
    database = f"{tenancy.name_prefix}_acme"
    with tenancy.admin_engine.begin() as conn:
        conn.execute(
            text(
                "insert into tenancy.tenants (slug, name, strategy, status, location) values "
                "('acme', 'acme', 'database', 'provisioning', '{\"server\": \"main\"}')"
            )
        )
    tenancy_server.execute(f'create database "{database}" owner "{tenancy_server.admin_role}"')
    with pytest.raises(ProvisioningError, match="exists already"):
        tenancy.create_tenant("acme", placement="database")
    after = catalog(tenancy)
    assert database in after["databases"] and "acme" not in after["tenants"]
    tenancy_server.execute(f'drop database "{database}"')  # what the message asks for
    tenancy.create_tenant("acme", placement="database")


def test_delete_leaves_nothing(dbt: Tenancy) -> None:
    acme = dbt.get_tenant("acme")
    before = catalog(dbt)
    dbt.delete_tenant("acme")
    after = catalog(dbt)
    assert before["databases"] - after["databases"] == {f"{dbt.name_prefix}_acme"}
    assert before["roles"] - after["roles"] == {
        f"{dbt.name_prefix}_acme_app",
        f"{dbt.name_prefix}_acme_anon",
        fdw_role_name(acme.id, dbt.name_prefix),
    }
    assert before["tenants"] - after["tenants"] == {"acme"}
    with dbt.admin_engine.connect() as conn:
        assert (
            conn.execute(
                text("select count(*) from auth.users where tenant_id = :t"), {"t": acme.id}
            ).scalar()
            == 0
        )
    with tenant_context("globex"), dbt.sessionmaker()() as s:
        assert s.scalars(select(User.email)).all() == ["x@globex.test"]


def test_delete_can_keep_infrastructure_rows(dbt: Tenancy) -> None:
    acme = dbt.get_tenant("acme")
    dbt.delete_tenant("acme", keep_infrastructure_rows=True)
    with dbt.admin_engine.connect() as conn:
        assert (
            conn.execute(
                text("select count(*) from auth.users where tenant_id = :t"), {"t": acme.id}
            ).scalar()
            == 1
        )


def test_refresh_foreign_schemas_follows_infrastructure_changes(dbt: Tenancy) -> None:
    with dbt.admin_engine.begin() as conn:
        conn.execute(text("alter table auth.users add column nickname text"))
        conn.execute(text("alter table auth.users rename column email to mail"))
        conn.execute(text("create table auth.notices (id serial primary key, body text)"))
        conn.execute(text("insert into auth.notices (body) values ('maintenance tonight')"))
    with tenant_context("acme"), dbt.connect() as conn:
        with pytest.raises(exc.DBAPIError):  # the foreign table still has the old shape
            conn.execute(text("select email from auth.users")).all()
    refreshed = dbt.refresh_foreign_schemas()
    assert sorted(t.slug for t in refreshed) == ["acme", "globex"]
    dbt.refresh_foreign_schemas("acme")  # idempotent
    with tenant_context("acme"), dbt.connect() as conn:
        assert conn.execute(text("select mail, nickname from auth.users")).all() == [("x@acme.test", None)]
        conn.execute(text("insert into auth.users (mail, nickname) values ('n@acme.test', 'n')"))
        # a table created after the tenant: readable (global tables are read-only for tenants)
        assert conn.execute(text("select body from auth.notices")).scalars().all() == ["maintenance tonight"]
        conn.commit()
    with tenant_context("globex"), dbt.connect() as conn:
        assert conn.execute(text("select mail from auth.users")).scalars().all() == ["x@globex.test"]


def test_engine_cache_is_bounded_and_counts(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    t = database_tenants(
        tenancy_factory,
        tenancy_server,
        ("t1", "t2", "t3"),
        max_tenant_engines=2,
        tenant_pool_size=1,
        tenant_max_overflow=0,
    )
    maker = t.sessionmaker()
    with tenant_context("t1"), t.connect() as held:  # a connection checked out across the eviction
        held.execute(text("select 1"))
        for slug in ("t2", "t3", "t2", "t3"):
            with tenant_context(slug), maker() as s:
                assert s.scalar(select(func.count()).select_from(Project)) == 0
        stats = t.tenant_engines.stats()
        assert stats.engines == 2 and stats.evictions >= 1 and stats.hits >= 1
        assert held.execute(text("select count(*) from projects")).scalar() == 0  # still works
    assert t.tenant_engines.stats().open_connections <= 2


def test_tenant_on_another_server(tenancy: Tenancy, tenancy_server: TestServer) -> None:
    with TemporaryCluster() as eu:
        su = create_engine(eu.url(), isolation_level="AUTOCOMMIT")
        with su.connect() as conn:
            conn.exec_driver_sql("create role eu_admin login createdb createrole password 'eu-admin-pw'")
        su.dispose()
        eu_admin = eu.url(user="eu_admin", password="eu-admin-pw")
        remote = Tenancy(
            tenancy.url,
            admin_url=tenancy.admin_url,
            metadata=Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
            secret_key=SECRET,
            name_prefix=tenancy.name_prefix,
            servers={"eu": eu_admin},
        )
        try:
            remote.prepare_server(eu.url(), server="eu")
            remote.create_tenant("faraway", placement="database", server="eu")
            with tenant_context("faraway"), remote.sessionmaker()() as s:
                s.add_all([Project(name="far"), User(email="far@eu.test")])
                s.commit()
                assert s.execute(text("select inet_server_port()")).scalar() == eu.port
                assert s.scalars(select(User.email)).all() == ["far@eu.test"]
            with tenancy.admin_engine.connect() as conn:  # infrastructure stayed in the main database
                assert (
                    conn.execute(text("select count(*) from auth.users where email = 'far@eu.test'")).scalar()
                    == 1
                )
            with pytest.raises(ProvisioningError, match="Unknown server"):
                remote.create_tenant("nowhere", placement="database", server="mars")
            remote.delete_tenant("faraway")
            with create_engine(eu.url()).connect() as conn:
                assert (
                    conn.execute(
                        text("select count(*) from pg_database where datname like '%faraway%'")
                    ).scalar()
                    == 0
                )
        finally:
            remote.dispose()


def test_concurrent_creation_of_one_slug(tenancy: Tenancy, tenancy_server: TestServer) -> None:
    import threading

    tenancy.prepare_server(tenancy_server.superuser_url)
    before = catalog(tenancy)
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            tenancy.create_tenant("acme", placement="database")
            outcomes.append("created")
        except ProvisioningError as error:
            outcomes.append("exists" if "exists already" in str(error) else repr(error))

    threads = [threading.Thread(target=attempt) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created", "exists", "exists"]
    after = catalog(tenancy)
    assert after["databases"] - before["databases"] == {f"{tenancy.name_prefix}_acme"}
    assert after["tenants"] - before["tenants"] == {"acme"}
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        assert s.scalars(select(Project)).all() == []


def test_create_database_strategy_file_copy(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    with pytest.raises(Exception, match="create_database_strategy"):
        tenancy_factory(Base.metadata, create_database_strategy="rsync")
    t = database_tenants(tenancy_factory, tenancy_server, ("acme",), create_database_strategy="file_copy")
    with tenant_context("acme"), t.sessionmaker()() as s:
        s.add(Project(name="copied"))
        s.commit()
        assert s.scalars(select(Project.name)).all() == ["copied"]


def test_connection_budget_is_respected(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    from sqla_tenancy import TenancyError

    t = database_tenants(
        tenancy_factory,
        tenancy_server,
        ("b1", "b2", "b3"),
        tenant_pool_size=1,
        tenant_max_overflow=1,
        max_tenant_connections=2,
    )
    t.tenant_engines.budget_timeout = 0.5
    with tenant_context("b1"), t.connect() as one, tenant_context("b2"), t.connect() as two:
        one.execute(text("select 1"))
        two.execute(text("select 1"))
        assert t.tenant_engines.stats().open_connections == 2
        with pytest.raises(TenancyError, match="in use"), tenant_context("b3"), t.connect():
            pass  # the third connection waits for the budget, then gives up
    # closed connections free the budget (here: the pools are disposed)
    t.tenant_engines.clear()
    with tenant_context("b3"), t.connect() as three:
        assert three.execute(text("select 1")).scalar() == 1
    assert t.tenant_engines.stats().peak_connections <= 2


async def test_dispose_async_closes_database_tenants_async_connections(dbt: Tenancy) -> None:
    maker = dbt.async_sessionmaker()
    with tenant_context("acme"):
        async with maker() as s:
            assert (await s.scalars(select(Project.name))).all() == ["acme-p"]
    await dbt.dispose_async()
    with create_engine(dbt.admin_url).connect() as conn:
        left = conn.execute(
            text("select count(*) from pg_stat_activity where usename = :r"),
            {"r": f"{dbt.name_prefix}_acme_app"},
        ).scalar()
    assert left == 0


def test_two_tenancies_in_one_process_fill_tenant_id_from_their_own(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    first = tenancy_factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE)
    first.install()
    acme = first.create_tenant("acme")
    other_db = tenancy_server.create_database()
    second = Tenancy(
        tenancy_server.url(other_db),
        admin_url=tenancy_server.url(other_db, role="admin"),
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        name_prefix=tenancy_server.name_prefix(other_db),
    )
    try:
        second.install()  # created last: the process's "active" Tenancy
        with tenant_context(acme.id), first.sessionmaker()() as s:
            s.add(Project(name="from-first"))
            s.commit()
            assert s.scalars(select(Project.tenant_id)).all() == [acme.id]
    finally:
        second.dispose()
        tenancy_server.drop_database(other_db)


def test_tenant_roles_get_the_configured_scram_iterations(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    t = database_tenants(tenancy_factory, tenancy_server, ("it1",), tenant_scram_iterations=16)
    location = t.get_tenant("it1").location
    with tenancy_server.superuser.connect() as conn:
        verifiers = dict(
            conn.execute(
                text("select rolname, rolpassword from pg_authid where rolname = any(:r)"),
                {"r": [location["role"], location["fdw_role"]]},
            ).all()
        )
    assert set(verifiers) == {location["role"], location["fdw_role"]}
    assert all(v.startswith("SCRAM-SHA-256$16:") for v in verifiers.values())
    with tenant_context("it1"), t.sessionmaker()() as s:  # the role logs in, FDW included
        assert s.scalar(select(func.count()).select_from(Project)) == 0
        assert s.scalar(select(func.count()).select_from(User)) == 0


@pytest.mark.parametrize("iterations", [0, -1, 1.5, True])
def test_scram_iterations_must_be_a_positive_count(
    tenancy_factory: Callable[..., Tenancy], iterations: object
) -> None:
    from sqla_tenancy import ConfigurationError

    with pytest.raises(ConfigurationError, match="tenant_scram_iterations"):
        tenancy_factory(Base.metadata, secret_key=SECRET, tenant_scram_iterations=iterations)


@pytest.mark.parametrize(
    ("poolers", "match"),
    [
        ({"eu": "postgresql://pooler:6432"}, "unknown server 'eu'"),
        ({"main": "postgresql://someone@pooler:6432"}, "address only"),
        ({"main": "postgresql://pooler:6432/app"}, "address only"),
        ({"main": "postgresql://:secret@pooler:6432"}, "address only"),
        ({"main": "postgresql://pooler:6432?user=someone"}, "address only"),
        ({"main": "postgresql://pooler:6432?dbname=app"}, "address only"),
        ({"main": "postgresql://pooler:6432?service=other"}, "address only"),
        ({"main": "postgresql:///?host=/tmp"}, "host"),
        ({"main": "mysql://pooler:6432"}, "PostgreSQL"),
    ],
)
def test_tenant_poolers_are_checked(
    tenancy_factory: Callable[..., Tenancy], poolers: dict[str, str], match: str
) -> None:
    from sqla_tenancy import ConfigurationError

    with pytest.raises(ConfigurationError, match=match):
        tenancy_factory(Base.metadata, secret_key=SECRET, tenant_poolers=poolers)


def test_rehash_role_passwords_applies_a_new_iteration_count_to_existing_roles(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    from sqla_tenancy import UnsupportedOperation

    first = database_tenants(tenancy_factory, tenancy_server, ("rh1", "rh2"))
    first.create_tenant("rhshared")
    later = tenancy_factory(
        Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        secret_key=SECRET,
        name_prefix=first.name_prefix,
        tenant_scram_iterations=8,
    )

    def verifiers() -> dict[str, str]:
        roles = [
            str(later.get_tenant(slug).location[key])
            for slug in ("rh1", "rh2")
            for key in ("role", "fdw_role")
        ]
        with tenancy_server.superuser.connect() as conn:
            rows = conn.execute(
                text("select rolname, rolpassword from pg_authid where rolname = any(:r)"), {"r": roles}
            ).all()
        return {name: password.split(":", 1)[0] for name, password in rows}

    assert set(verifiers().values()) == {"SCRAM-SHA-256$4096"}
    with tenant_context("rh1"), later.sessionmaker()() as s:  # a connection open across the change
        s.scalar(select(func.count()).select_from(Project))
        assert [t.slug for t in later.rehash_role_passwords("rh1")] == ["rh1"]
        assert s.scalar(select(func.count()).select_from(User)) == 0
    assert sorted(v for v in verifiers().values()) == ["SCRAM-SHA-256$4096"] * 2 + ["SCRAM-SHA-256$8"] * 2
    assert {t.slug for t in later.rehash_role_passwords()} == {"rh1", "rh2"}
    assert set(verifiers().values()) == {"SCRAM-SHA-256$8"}
    later.tenant_engines.clear()
    for slug in ("rh1", "rh2"):  # the same passwords: new connections log in, FDW included
        with tenant_context(slug), later.sessionmaker()() as s:
            assert s.scalar(select(func.count()).select_from(User)) == 0
    with pytest.raises(UnsupportedOperation, match="not a database tenant"):
        later.rehash_role_passwords("rhshared")


def test_a_tenant_seen_once_does_not_push_out_one_in_steady_use(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    t = database_tenants(
        tenancy_factory,
        tenancy_server,
        ("c1", "c2", "c3"),
        max_tenant_engines=2,
        tenant_pool_size=1,
        tenant_max_overflow=0,
        max_tenant_connections=2,  # the cached engines' idle connections fill the budget
    )
    t.tenant_engines.budget_timeout = 0.5
    maker = t.sessionmaker()

    def visit(*slugs: str) -> None:
        for slug in slugs:
            with tenant_context(slug), maker() as s:
                assert s.scalar(select(func.count()).select_from(Project)) == 0

    def cached() -> set[str]:
        held = {key[0] for key in t.tenant_engines._engines}  # type: ignore[index]
        return {slug for slug in ("c1", "c2", "c3") if t.get_tenant(slug).id in held}

    visit("c1", "c1", "c1", "c2", "c2", "c2")
    # served (an idle connection of the least recently used engine closes to make room in the
    # budget), but c1 and c2 keep their places; c3's connection closes after use
    visit("c3")
    stats = t.tenant_engines.stats()
    assert cached() == {"c1", "c2"} and stats.passed_over == 1 and stats.evictions == 0
    assert stats.open_connections <= 2
    visit("c1", "c2", "c3", "c1", "c2", "c3")  # a cycle over more tenants than the cache holds
    stats = t.tenant_engines.stats()
    assert cached() == {"c1", "c2"} and stats.evictions == 0 and stats.passed_over == 3
    visit(*["c3"] * 10)  # c3 becomes busier than the least recently used one: it takes its place
    stats = t.tenant_engines.stats()
    assert "c3" in cached() and len(cached()) == 2 and stats.evictions == 1
    assert stats.open_connections <= 2
