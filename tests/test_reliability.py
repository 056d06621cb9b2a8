"""Reliability under load and faults: deleting tenants that other processes use, concurrent
provisioning, pools after their connections were killed."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text

from sqla_tenancy import (
    ConfigurationError,
    DeletionError,
    ProvisioningError,
    Tenancy,
    TenantNotFound,
    TenantRefused,
    grants,
    tenant_context,
)
from sqla_tenancy.testing import TestServer

from .conftest import SECRET
from .fault_probe import create_database_tenant, hold_connections, write_until_refused
from .models import INFRASTRUCTURE, Base, Project, User


def child_options(t: Tenancy) -> dict[str, Any]:
    """What another process of the same application passes to Tenancy."""
    return {
        "url": t.url.render_as_string(hide_password=False),
        "admin_url": t.admin_url.render_as_string(hide_password=False),
        "secret_key": SECRET,
        "name_prefix": t.name_prefix,
    }


def catalog(t: Tenancy) -> dict[str, set[str]]:
    with t.admin_engine.connect() as conn:
        return {
            "databases": set(conn.execute(text("select datname from pg_database")).scalars()),
            "roles": set(conn.execute(text("select rolname from pg_roles")).scalars()),
            "tenants": set(conn.execute(text("select slug from tenancy.tenants")).scalars()),
        }


@pytest.fixture
def dbt(tenancy: Tenancy, tenancy_server: TestServer) -> Tenancy:
    tenancy.prepare_server(tenancy_server.superuser_url)
    tenancy.create_tenant("acme", placement="database")
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        s.add_all([Project(name="p"), User(email="x@acme.test")])
        s.commit()
    return tenancy


def test_delete_a_database_tenant_another_process_holds_connections_to(dbt: Tenancy) -> None:
    mp = multiprocessing.get_context("spawn")
    ready, go, out = mp.Event(), mp.Event(), mp.Queue()
    child = mp.Process(target=hold_connections, args=(child_options(dbt), "acme", ready, go, out))
    child.start()
    try:
        assert ready.wait(60), "the probe process did not start"
        dbt.delete_tenant("acme")
        go.set()
        dropped, refused = out.get(timeout=60)
    finally:
        child.join(timeout=30)
    left = catalog(dbt)
    assert not {d for d in left["databases"] if d.startswith(f"{dbt.name_prefix}_acme")}
    assert not {r for r in left["roles"] if r.startswith(f"{dbt.name_prefix}_acme")}
    assert "acme" not in left["tenants"]
    assert dropped is not None and dropped < 1.0, "the other process kept the deleted tenant's pool"
    assert refused == "TenantNotFound"


@pytest.mark.parametrize("placement", ["shared", "schema", "database"])
def test_delete_under_concurrent_writers_leaves_nothing(
    tenancy: Tenancy, tenancy_server: TestServer, placement: str
) -> None:
    if placement == "database":
        tenancy.prepare_server(tenancy_server.superuser_url)
    acme = tenancy.create_tenant("acme", placement=placement)
    mp = multiprocessing.get_context("spawn")
    ready, out = mp.Event(), mp.Queue()
    child = mp.Process(target=write_until_refused, args=(child_options(tenancy), "acme", 3, ready, out))
    child.start()
    try:
        assert ready.wait(60), "the writers did not start"
        tenancy.delete_tenant("acme")
        commits, stopped = out.get(timeout=90)
    finally:
        child.join(timeout=30)
    print(f"{placement}: {commits} commits before the deletion; writers stopped by {stopped}")
    with tenancy.admin_engine.connect() as conn:
        left = {
            table: conn.execute(
                text(f"select count(*) from {table} where tenant_id = :t"), {"t": acme.id}
            ).scalar()
            for table in ("auth.users", "projects")
        }
    assert left == {"auth.users": 0, "projects": 0}
    assert "acme" not in catalog(tenancy)["tenants"]


@pytest.mark.parametrize("admission", ["procedure", "earlier function"])
@pytest.mark.parametrize("placement", ["shared", "schema"])
def test_the_database_refuses_a_tenant_a_stale_cache_still_serves(
    tenancy: Tenancy, placement: str, admission: str
) -> None:
    tenancy.create_tenant("acme", placement=placement)
    if admission == "earlier function":  # a main database installed before the procedure existed
        with tenancy.admin_engine.begin() as conn:
            conn.execute(text("drop procedure tenancy.admit(uuid, text)"))
    stale = Tenancy(
        tenancy.url,
        admin_url=tenancy.admin_url,
        metadata=tenancy.metadata,
        infrastructure_schemas=tenancy.infrastructure_schemas,
        name_prefix=tenancy.name_prefix,
        registry_ttl=300.0,
        registry_listen=False,  # nothing tells this one
    )
    try:
        with tenant_context("acme"), stale.engine.connect() as conn:
            assert conn.execute(text("select count(*) from projects")).scalar() == 0
            binding = stale.router.current().binding
        assert binding is not None
        expected = b"CALL tenancy.admit(" if admission == "procedure" else b"SELECT tenancy.admit_tenant("
        assert expected in binding
        tenancy.suspend_tenant("acme")
        with tenant_context("acme"), stale.engine.connect() as conn, pytest.raises(TenantRefused):
            conn.execute(text("select count(*) from projects"))
        assert stale.get_tenant("acme").status == "active"  # its cache had not caught up
    finally:
        stale.dispose()


def test_a_deletion_that_fails_removes_nothing_and_a_rerun_finishes_it(
    dbt: Tenancy, tenancy_server: TestServer
) -> None:
    acme = dbt.get_tenant("acme")
    database = f"{dbt.name_prefix}_acme"
    # a superuser's session in the tenant database: only a superuser may end it
    superuser = tenancy_server.superuser_url.set(database=database)
    blocker = psycopg.connect(
        host=superuser.host,
        port=superuser.port,
        user=superuser.username,
        password=superuser.password,
        dbname=database,
        autocommit=True,
    )
    try:
        with pytest.raises(DeletionError, match="rerun delete_tenant"):
            dbt.delete_tenant("acme")
        assert dbt.get_tenant("acme").status == "deleting"
        with tenant_context("acme"), pytest.raises(TenantNotFound):
            dbt.connect()
        left = catalog(dbt)
        assert database in left["databases"]
        with dbt.admin_engine.connect() as conn:  # its infrastructure rows are still there
            users = conn.execute(text("select count(*) from auth.users where tenant_id = :t"), {"t": acme.id})
            assert users.scalar() == 1
        with pytest.raises(ProvisioningError, match=r"is being deleted.*rerun delete_tenant\('acme'\)"):
            dbt.create_tenant("acme", placement="database")
    finally:
        blocker.close()
    dbt.delete_tenant("acme")
    left = catalog(dbt)
    assert database not in left["databases"] and "acme" not in left["tenants"]
    with dbt.admin_engine.connect() as conn:
        users = conn.execute(text("select count(*) from auth.users where tenant_id = :t"), {"t": acme.id})
        assert users.scalar() == 0
    dbt.create_tenant("acme", placement="database")  # the slug is free again


def test_fresh_processes_provision_database_tenants_at_once(
    tenancy: Tenancy, tenancy_server: TestServer
) -> None:
    processes, rounds = 4, int(os.environ.get("SQLA_TENANCY_PROVISIONING_ROUNDS", "5"))
    tenancy.prepare_server(tenancy_server.superuser_url)
    mp = multiprocessing.get_context("spawn")
    failures: list[str] = []
    for round_ in range(rounds):
        start, out = mp.Barrier(processes), mp.Queue()
        slugs = [f"r{round_}p{i}" for i in range(processes)]
        children = [
            mp.Process(target=create_database_tenant, args=(child_options(tenancy), slug, start, out))
            for slug in slugs
        ]
        for child in children:
            child.start()
        try:
            results = [out.get(timeout=120) for _ in children]
        finally:
            for child in children:
                child.join(timeout=30)
        failures += [f"{slug}: {error}" for slug, error in results if error is not None]
    print(f"{processes} processes x {rounds} rounds: {len(failures)} failed provisionings")
    assert failures == [], "\n".join(failure[:300] for failure in failures)
    tenants = {t.slug for t in tenancy.list_tenants() if t.status == "active"}
    assert {f"r{r}p{i}" for r in range(rounds) for i in range(processes)} <= tenants


def race(rounds: int, *actions: Callable[[int], object]) -> list[str]:
    """Run each action ``rounds`` times (with the round's number) in a thread of its own, all
    started at once; the failures, as ``"<type>: <message>"``."""
    start = threading.Barrier(len(actions))
    failures: list[str] = []

    def work(action: Callable[[int], object]) -> None:
        start.wait()
        for round_ in range(rounds):
            try:
                action(round_)
            except Exception as error:  # noqa: BLE001 (counted, then asserted)
                failures.append(f"{type(error).__name__}: {error}"[:300])

    workers = [threading.Thread(target=work, args=(action,)) for action in actions]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    return failures


def test_concurrent_grants_on_the_main_database_take_turns(dbt: Tenancy) -> None:
    """Each provisioning of a database tenant, each refresh of its foreign schemas and install()
    grant on the same objects of the main database (its row, the schemas, the infrastructure
    tables); two GRANTs on one object at once fail with ``tuple concurrently updated``. Without
    the lock, 4 threads x 15 rounds failed 3 to 6 times in 60 (PostgreSQL 15 and 18), some of them
    as deadlocks."""
    dbt.create_tenant("globex", placement="database")
    rounds = 15
    failures = race(
        rounds,
        lambda _: dbt.install(),
        lambda _: dbt.refresh_foreign_schemas("acme"),
        lambda _: dbt.refresh_foreign_schemas("globex"),
        lambda _: dbt.refresh_foreign_schemas("acme"),
    )
    print(f"4 threads x {rounds} rounds of install() / refresh: {len(failures)} failed")
    assert failures == [], "\n".join(failures)


def test_a_new_keeper_and_concurrent_grants_take_turns(dbt: Tenancy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Making a keeper role (PostgreSQL 16+, one per 32 schema tenants; here one per tenant)
    grants it and takes back ``CREATE`` on the ``tenancy`` schema, whose catalog row the tenants'
    group grants of a database tenant's provisioning or refresh rewrite too."""
    with dbt.admin_engine.connect() as conn:
        if int(conn.exec_driver_sql("show server_version_num").scalar_one()) < 160000:
            pytest.skip("keepers are made on PostgreSQL 16+ only")
    monkeypatch.setattr(grants, "KEEPER_TENANTS", 1)
    rounds = 15
    failures = race(
        rounds,
        lambda round_: dbt.create_tenant(f"k{round_}", placement="schema"),
        lambda _: dbt.refresh_foreign_schemas("acme"),
    )
    print(f"{rounds} new keepers against {rounds} refreshes: {len(failures)} failed")
    assert failures == [], "\n".join(failures)


def terminate_sessions(server: TestServer, *databases: str) -> int:
    """End, as a superuser from a connection of its own, every other session in ``databases``."""
    url = server.superuser_url
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname="postgres"
    ) as conn:
        pids = [
            pid
            for (pid,) in conn.execute(
                "select pid from pg_stat_activity where datname = any(%s) and pid <> pg_backend_pid()",
                (list(databases),),
            )
        ]
        for pid in pids:
            conn.execute("select pg_terminate_backend(%s, 5000)", (pid,))
    return len(pids)


@pytest.mark.parametrize("placement", ["shared", "schema", "database"])
def test_pooled_connections_the_server_ended_are_replaced(
    tenancy: Tenancy, tenancy_server: TestServer, placement: str
) -> None:
    if placement == "database":
        tenancy.prepare_server(tenancy_server.superuser_url)
    tenancy.create_tenant("acme", placement=placement)
    maker = tenancy.sessionmaker()

    def write_and_count() -> int:
        with tenant_context("acme"), maker() as s:
            s.add(Project(name="p"))
            s.commit()
            return len(s.scalars(select(Project)).all())

    def platform_count() -> int:
        with tenancy.admin_engine.connect() as conn:
            return int(conn.execute(text("select count(*) from tenancy.tenants")).scalar_one())

    assert write_and_count() == 1 and platform_count() == 2
    main = tenancy.url.database or ""
    ended = terminate_sessions(tenancy_server, main, f"{tenancy.name_prefix}_acme")
    assert ended >= 2  # at least the application's and the admin's pooled connections
    # the next transactions succeed: the pools replaced the dead connections before using them
    assert write_and_count() == 2 and platform_count() == 2


def test_the_test_servers_superuser_engine_survives_ended_sessions(tenancy_server: TestServer) -> None:
    tenancy_server.execute("select 1")  # a pooled superuser connection
    assert terminate_sessions(tenancy_server, "postgres") >= 1
    tenancy_server.execute("select 1")


def test_a_routes_pinned_tenant_engine_follows_the_engine_cache(dbt: Tenancy) -> None:
    with tenant_context("acme"):
        first = dbt.bind_for_current()
        assert dbt.bind_for_current() is first  # pinned on the route while the cache keeps it
        hits = dbt.tenant_engines.stats().hits
        dbt.bind_for_current()
        assert dbt.tenant_engines.stats().hits == hits + 1  # still counted for the LRU
        dbt.tenant_engines.discard(lambda key: True)  # evicted (or the tenant's pools dropped)
        second = dbt.bind_for_current()
        assert second is not first
        with dbt.connect() as conn:
            assert conn.execute(text("select count(*) from projects")).scalar() == 1


def test_the_foreign_server_reaches_the_main_database_where_fdw_host_and_port_say(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    port = tenancy_server.superuser_url.port
    t = tenancy_factory(
        Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        secret_key=SECRET,
        fdw_host="localhost",
        fdw_port=port,
    )
    t.install()
    t.prepare_server(tenancy_server.superuser_url)
    t.create_tenant("acme", placement="database")
    with tenant_context("acme"), t.sessionmaker()() as s:
        s.add(User(email="x@acme.test"))
        s.commit()
        options = s.execute(text("select srvoptions from pg_foreign_server")).scalar_one()
    assert {"host=localhost", f"port={port}", f"dbname={t.admin_url.database}"} <= set(options)
    with t.admin_engine.connect() as conn:  # written through the foreign table, into the main database
        assert conn.execute(text("select count(*) from auth.users where email = 'x@acme.test'")).scalar() == 1


def test_fdw_port_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="fdw_port"):
        Tenancy("postgresql://u@h/db", metadata=Base.metadata, fdw_port=0)


def test_load_with_sessions_ended_periodically_loses_no_write_and_mixes_no_tenants(
    tenancy: Tenancy, tenancy_server: TestServer
) -> None:
    """A few threads write and read over tenants of every placement while every session of the
    application is ended every few hundred milliseconds. Every write whose commit returned is
    there, nothing else is, and no transaction ever sees another tenant's row.

    Three seconds by default; ``SQLA_TENANCY_SOAK_SECONDS=600 pytest tests/test_reliability.py -k
    load -s`` runs the long form."""
    import threading
    import time

    seconds = float(os.environ.get("SQLA_TENANCY_SOAK_SECONDS", "3"))
    tenancy.prepare_server(tenancy_server.superuser_url)
    slugs = {"one": "shared", "two": "shared", "sch": "schema", "dbt": "database"}
    for slug, placement in slugs.items():
        tenancy.create_tenant(slug, placement=placement)
    maker = tenancy.sessionmaker()
    lock = threading.Lock()
    committed: dict[str, set[str]] = {slug: set() for slug in slugs}
    uncertain: dict[str, set[str]] = {slug: set() for slug in slugs}
    counts = {"commits": 0, "reads": 0, "failed": 0, "foreign rows": 0, "sessions ended": 0}
    deadline = time.monotonic() + seconds

    def work(worker: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            for slug in slugs:
                n += 1
                name = f"{slug}:{worker}:{n}"
                try:
                    with tenant_context(slug), maker() as s:
                        s.add(Project(name=name))
                        try:
                            s.commit()
                        except Exception:
                            with lock:
                                uncertain[slug].add(name)  # ended during the commit: either way
                            raise
                        with lock:
                            committed[slug].add(name)
                            counts["commits"] += 1
                        seen = s.scalars(select(Project.name)).all()
                    foreign = [other for other in seen if not other.startswith(f"{slug}:")]
                    with lock:
                        counts["reads"] += 1
                        counts["foreign rows"] += len(foreign)
                except Exception:  # noqa: BLE001 - a session ended under the transaction
                    with lock:
                        counts["failed"] += 1

    def end_sessions() -> None:
        while time.monotonic() < deadline:
            time.sleep(0.3)
            counts["sessions ended"] += terminate_sessions(
                tenancy_server, tenancy.url.database or "", f"{tenancy.name_prefix}_dbt"
            )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=end_sessions))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"\n{seconds:g} s over {len(slugs)} tenants: {counts}")
    for slug in slugs:
        with tenant_context(slug), maker() as s:
            present = set(s.scalars(select(Project.name)).all())
        assert committed[slug] <= present, f"{slug}: committed writes lost"
        assert present <= committed[slug] | uncertain[slug], f"{slug}: rows nobody committed"
    assert counts["foreign rows"] == 0
    assert counts["commits"] > 0 and counts["sessions ended"] > 0


@pytest.mark.parametrize("placement", ["shared", "schema"])
def test_a_deletion_waits_for_the_tenants_transaction_in_flight(tenancy: Tenancy, placement: str) -> None:
    import threading

    acme = tenancy.create_tenant("acme", placement=placement)
    maker = tenancy.sessionmaker()
    with tenant_context("acme"), maker() as s:
        s.add_all([Project(name="in flight"), User(email="late@acme.test")])
        s.flush()  # written, not committed
        deleting = threading.Thread(target=tenancy.delete_tenant, args=("acme",))
        deleting.start()
        deleting.join(timeout=1.0)
        assert deleting.is_alive(), "the deletion did not wait for the transaction in flight"
        s.commit()  # commits before the deletion deletes
    deleting.join(timeout=30)
    with tenancy.admin_engine.connect() as conn:
        for table in ("projects", "auth.users"):
            rows = conn.execute(text(f"select count(*) from {table} where tenant_id = :t"), {"t": acme.id})
            assert rows.scalar() == 0, table
    assert "acme" not in catalog(tenancy)["tenants"]


def test_a_deletion_that_times_out_deletes_nothing(tenancy: Tenancy) -> None:
    acme = tenancy.create_tenant("acme")
    with tenant_context("acme"), tenancy.sessionmaker()() as s:
        s.add(Project(name="kept"))
        s.commit()
    holder = tenancy.sessionmaker()()
    with tenant_context("acme"):
        holder.add(Project(name="open"))
        holder.flush()
        try:
            with pytest.raises(DeletionError, match=r"still in flight after 0.5 s \(pid \d+"):
                tenancy.delete_tenant("acme", timeout=0.5)
        finally:
            holder.rollback()
            holder.close()
    assert tenancy.get_tenant("acme").status == "deleting"
    with tenancy.admin_engine.connect() as conn:
        rows = conn.execute(text("select name from projects where tenant_id = :t"), {"t": acme.id})
        assert rows.scalars().all() == ["kept"]
    tenancy.delete_tenant("acme")  # the rerun finishes it
    assert "acme" not in catalog(tenancy)["tenants"]


def test_without_the_admission_function_the_router_warns_and_binds_as_before(
    tenancy: Tenancy, caplog: pytest.LogCaptureFixture
) -> None:
    tenancy.create_tenant("acme")
    with tenancy.admin_engine.begin() as conn:  # a main database installed by an earlier version
        conn.execute(text("drop function tenancy.admit_tenant(uuid)"))
    with caplog.at_level("WARNING", logger="sqla_tenancy.isolation"):
        with tenant_context("acme"), tenancy.connect() as conn:
            assert conn.execute(text("select count(*) from projects")).scalar() == 0
    assert "Run tenancy.install()" in caplog.text
    tenancy.install()  # puts it back
    with tenancy.admin_engine.connect() as conn:
        assert conn.execute(text("select to_regprocedure('tenancy.admit_tenant(uuid)')")).scalar()


def test_another_process_drops_a_suspended_tenants_pool_and_keeps_the_others(dbt: Tenancy) -> None:
    dbt.create_tenant("globex", placement="database")
    other = Tenancy(
        dbt.url,
        admin_url=dbt.admin_url,
        metadata=dbt.metadata,
        infrastructure_schemas=dbt.infrastructure_schemas,
        name_prefix=dbt.name_prefix,
        secret_key=SECRET,
    )
    import time

    try:
        for slug in ("acme", "globex"):
            with tenant_context(slug), other.connect() as conn:
                conn.execute(text("select 1"))
        assert other.tenant_engines.stats().engines == 2
        dbt.suspend_tenant("acme")
        deadline = time.monotonic() + 2
        while other.tenant_engines.stats().engines != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert other.tenant_engines.stats().engines == 1  # globex's stays
        assert [key[0] for key in other.tenant_engines.held_keys()] == [dbt.get_tenant("globex").id]
    finally:
        other.dispose()


def app_connection(t: Tenancy) -> psycopg.Connection[Any]:
    """A bare connection as the application role, in autocommit (the test sends BEGIN itself)."""
    url = t.url
    return psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=True,
    )


@pytest.mark.parametrize("change", ["delete", "suspend", "move"])
@pytest.mark.parametrize("placement", ["shared", "schema"])
def test_an_admission_whose_snapshot_predates_the_tenants_stop_is_refused(
    tenancy: Tenancy, placement: str, change: str
) -> None:
    """A repeatable-read transaction reads with the snapshot of its first statement, which for
    a bound transaction is the admission itself, taken before the serving lock: a deletion,
    suspension or move that commits, and releases the lock, between the two must not let it in
    (a moved tenant's transaction would write where the tenant no longer is). Here the snapshot
    is taken one statement earlier, which makes that window as long as needed."""
    acme = tenancy.create_tenant("acme", placement=placement)
    with app_connection(tenancy) as conn:
        conn.execute("begin isolation level repeatable read")
        conn.execute("select 1")  # the transaction's snapshot: the tenant is active in it
        if change == "move":
            tenancy.move_tenant("acme", "schema" if placement == "shared" else "shared")
        else:
            getattr(tenancy, f"{change}_tenant")("acme")
        with pytest.raises(psycopg.errors.SerializationFailure, match="retry the transaction"):
            conn.execute("call tenancy.admit(%s, %s)", (acme.id, placement))
        conn.execute("rollback")
        conn.execute("begin isolation level repeatable read")  # the retry is refused outright
        with pytest.raises(psycopg.Error, match="may not be served") as refused:
            conn.execute("call tenancy.admit(%s, %s)", (acme.id, placement))
        assert refused.value.sqlstate == "TNREF"


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
def test_a_registry_row_touched_without_stopping_the_tenant_still_admits(
    tenancy: Tenancy, isolation: str
) -> None:
    """An update that rolled back, or one still in progress, leaves its transaction id on the
    row the admission reads: the tenant stays admitted (the first case for as long as the row
    keeps it, the second because a stop that commits later waits for the serving lock)."""
    acme = tenancy.create_tenant("acme")
    with tenancy.admin_engine.connect() as admin:
        admin.execute(text("update tenancy.tenants set status = 'suspended' where id = :t"), {"t": acme.id})
        admin.rollback()
        with app_connection(tenancy) as conn:
            conn.execute(f"begin isolation level {isolation}")
            conn.execute("select 1")
            conn.execute("call tenancy.admit(%s, 'shared')", (acme.id,))
            conn.execute("commit")
            admin.execute(
                text("update tenancy.tenants set status = 'suspended' where id = :t"), {"t": acme.id}
            )
            conn.execute(f"begin isolation level {isolation}")
            conn.execute("call tenancy.admit(%s, 'shared')", (acme.id,))  # the suspension is not committed
            conn.execute("commit")
            admin.rollback()
    isolation_level = isolation.upper().replace(" ", "_")
    with tenant_context("acme"), tenancy.connect().execution_options(isolation_level=isolation_level) as conn:
        assert conn.execute(text("select count(*) from projects")).scalar() == 0


class StoppedAtTheServingLock:
    """gdb attached to a backend, with a breakpoint where the admission takes the serving lock:
    the backend stops there, after the admission's snapshot was taken and before the lock, for
    as long as the test wants (a backend the operating system did not schedule for a while)."""

    def __init__(self, pid: int) -> None:
        import subprocess

        self.gdb = subprocess.Popen(
            [
                "gdb",
                "-q",
                "-nx",
                "-p",
                str(pid),
                "-ex",
                "set pagination off",
                "-ex",
                "break pg_try_advisory_xact_lock_shared_int8",
                "-ex",
                "continue",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.running.wait(60), "gdb did not attach:\n" + "".join(self.output)

    def _read(self) -> None:
        assert self.gdb.stdout is not None
        for line in self.gdb.stdout:
            self.output.append(line)
            if line.startswith("Continuing."):
                self.running.set()
            elif "Breakpoint 1, " in line:
                self.stopped.set()

    def wait(self, timeout: float = 30.0) -> None:
        assert self.stopped.wait(timeout), "the backend never reached the serving lock:\n" + "".join(
            self.output
        )

    def resume(self) -> None:
        assert self.gdb.stdin is not None
        self.gdb.stdin.write("delete\ndetach\nquit\n")
        self.gdb.stdin.flush()
        self.gdb.wait(30)


@pytest.mark.skipif(shutil.which("gdb") is None, reason="needs gdb (.ci/run installs it)")
@pytest.mark.parametrize("isolation", ["READ COMMITTED", "REPEATABLE READ"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("placement", ["shared", "schema"])
def test_a_transaction_whose_admission_stalls_across_a_whole_deletion_is_refused(
    tenancy: Tenancy, placement: str, mode: str, isolation: str
) -> None:
    """The admission reads the tenant's row with the snapshot of its own statement (under
    repeatable read, the transaction's), which is taken before the serving lock. A backend
    descheduled in between for as long as a whole deletion takes finds the lock free again
    afterwards: it must still be refused (under repeatable read: a serialization failure, whose
    retry is refused), and nothing of the tenant may be left."""
    from sqlalchemy.exc import OperationalError

    acme = tenancy.create_tenant("acme", placement=placement)
    # an infrastructure table: a schema tenant's rows in it outlive its schema
    insert = text("insert into auth.users (email) values ('late@acme.test')")
    attached = threading.Event()
    stalled: list[StoppedAtTheServingLock] = []
    outcome: dict[str, object] = {}

    def attach(pid: object) -> None:
        assert isinstance(pid, int)
        stalled.append(StoppedAtTheServingLock(pid))
        attached.set()

    def write_sync() -> None:
        with tenant_context("acme"), tenancy.connect() as conn:
            conn.execution_options(isolation_level=isolation)
            attach(conn.execute(text("select pg_backend_pid()")).scalar())
            conn.commit()
            conn.execute(insert)  # its binding runs into the breakpoint
            conn.commit()

    async def write_async() -> None:
        with tenant_context("acme"):
            async with tenancy.async_engine.connect() as conn:
                await conn.execution_options(isolation_level=isolation)
                attach((await conn.execute(text("select pg_backend_pid()"))).scalar())
                await conn.commit()
                await conn.execute(insert)
                await conn.commit()

    def write() -> None:
        try:
            write_sync() if mode == "sync" else asyncio.run(write_async())
            outcome["result"] = "committed"
        except Exception as error:  # noqa: BLE001 - the test inspects what it was
            outcome["result"] = error

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert attached.wait(60), outcome
        stalled[0].wait()
        tenancy.delete_tenant("acme", timeout=5)
    finally:
        if stalled:
            stalled[0].resume()
        writer.join(30)
    result = outcome.get("result")
    if isolation == "READ COMMITTED":
        assert isinstance(result, TenantRefused), outcome
    else:
        assert isinstance(result, OperationalError), outcome
        assert isinstance(result.orig, psycopg.errors.SerializationFailure), outcome
    with tenancy.admin_engine.connect() as admin:
        rows = admin.execute(text("select count(*) from auth.users where tenant_id = :t"), {"t": acme.id})
        assert rows.scalar() == 0
    assert "acme" not in catalog(tenancy)["tenants"]
