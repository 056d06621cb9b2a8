"""Behind PgBouncer in transaction pooling, nothing of a tenant survives its transaction.

With ``pool_mode = transaction`` every client transaction borrows whichever server connection is
idle, and PgBouncer runs no reset query between clients. Many clients interleaving transactions of
different tenants over a few server connections are the harshest test of the claim that the tenant
binding (``search_path``, role, ``app.current_tenant_id``) is transaction-local: anything left at
session level would surface in another client's transaction, on another tenant's rows.

Requires Debian's ``pgbouncer`` binary; the PostgreSQL server is the run's test server.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from sqlalchemy import exc, insert, select, text

from sqla_tenancy import Tenancy, Tenant, platform_context, tenant_context
from sqla_tenancy.identifiers import quote_ident
from sqla_tenancy.placements.database import derive_password
from sqla_tenancy.testing import TestServer
from sqla_tenancy.testing.pgbouncer import PgBouncer

from .conftest import SECRET
from .models import INFRASTRUCTURE, Base, Project
from .test_database_placement import database_tenants

if not PgBouncer.available():
    pytest.skip(
        "the pgbouncer binary is not installed (Debian: apt-get install pgbouncer)", allow_module_level=True
    )

POOL = 3  # PgBouncer's server connections for the application role
SHARED = ("alpha", "bravo")
SCHEMA = ("charlie", "delta")
SLUGS = SHARED + SCHEMA
THREADS = 16
TRANSACTIONS = 40  # per thread
PROBE = (
    "select current_setting('app.current_tenant_id', true), current_user, current_schema(), pg_backend_pid()"
)


@dataclass
class Expected:
    """What a transaction of one tenant must see of its binding, and where its rows live."""

    tenant: Tenant
    user: str
    schema: str


@dataclass
class Bounced:
    tenancy: Tenancy
    bouncer: PgBouncer
    server: TestServer
    database: str
    expected: dict[str, Expected]
    seeded: dict[str, set[str]] = field(default_factory=dict)


def through(
    bouncer: PgBouncer,
    server: TestServer,
    database: str,
    *,
    pool_size: int,
    max_overflow: int,
    registry_ttl: float = 0.05,
) -> Tenancy:
    """A Tenancy whose application engine reaches ``database`` through ``bouncer`` only."""
    return Tenancy(
        bouncer.url(database, user=server.app_role, password=server.app_password),
        metadata=Base.metadata,
        admin_url=server.url(database, role="admin"),  # direct, not pooled
        infrastructure_schemas=INFRASTRUCTURE,
        # PgBouncer 1.18 does not track protocol-level prepared statements across server
        # connections: psycopg must not prepare any.
        engine_options={
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "connect_args": {"prepare_threshold": None},
        },
        # The registry gets a direct connection, as the docs advise behind a transaction pooler:
        # LISTEN needs a session of its own, and look-ups made mid-transaction must not wait
        # for a pooled server connection.
        registry_url=server.url(database),
        registry_ttl=registry_ttl,
        name_prefix=server.name_prefix(database),
    )


@pytest.fixture
def bounced(tenancy_server: TestServer, tenancy_database: str) -> Iterator[Bounced]:
    """An installed Tenancy whose application engine reaches PostgreSQL only through PgBouncer
    (transaction pooling, ``POOL`` server connections), with two shared and two schema tenants."""
    direct = tenancy_server.url(tenancy_database)
    assert direct.host is not None and direct.port is not None
    with PgBouncer(
        direct.host,
        direct.port,
        databases=[tenancy_database],
        users={tenancy_server.app_role: tenancy_server.app_password},
        pool_size=POOL,
        # Spread transactions over every server connection instead of PgBouncer's default LIFO
        # reuse: the more tenants each server connection serves in turn, the harsher the test.
        # A short query_wait_timeout turns a pool deadlock into a quick failure instead of a hang.
        settings={"server_round_robin": "1", "query_wait_timeout": "15"},
    ) as bouncer:
        # Many more client connections than PgBouncer has server connections; a tiny registry
        # TTL makes look-ups happen all the time.
        tenancy = through(bouncer, tenancy_server, tenancy_database, pool_size=THREADS, max_overflow=4)
        try:
            tenancy.install()
            expected: dict[str, Expected] = {}
            for slug in SLUGS:
                placement = "shared" if slug in SHARED else "schema"
                tenant = tenancy.create_tenant(slug, placement=placement)
                if placement == "shared":
                    expected[slug] = Expected(tenant, tenancy_server.app_role, "public")
                else:
                    expected[slug] = Expected(
                        tenant, f"{tenancy.name_prefix}_{slug}_app", f"{tenancy.name_prefix}_{slug}"
                    )
            world = Bounced(tenancy, bouncer, tenancy_server, tenancy_database, expected)
            maker = tenancy.sessionmaker()
            for slug in SLUGS:
                names = {f"{slug}-seed-{k}" for k in range(3)}
                with tenant_context(slug), maker() as s:
                    s.add_all(Project(name=n) for n in sorted(names))
                    s.commit()
                world.seeded[slug] = names
            yield world
        finally:
            tenancy.dispose()


class ServerConnections:
    """Samples, directly on PostgreSQL, how many server connections the application role holds."""

    def __init__(self, world: Bounced) -> None:
        self._world = world
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._run, name="pg_stat_activity-monitor", daemon=True)

    def _run(self) -> None:
        sql = text(
            # (backend_type and state are hidden from a role that is not pg_read_all_stats)
            "select count(*) from pg_stat_activity where usename = :role and datname = :db "
            "and application_name is distinct from 'sqla-tenancy-registry'"
        )
        params = {"role": self._world.server.app_role, "db": self._world.database}
        with self._world.tenancy.admin_engine.connect() as conn:
            while not self._stop.is_set():
                self.samples.append(int(conn.execute(sql, params).scalar_one()))
                conn.rollback()  # a fresh statistics snapshot for each sample
                self._stop.wait(0.005)

    def __enter__(self) -> ServerConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_interleaved_tenants_over_few_server_connections_never_mix(bounced: Bounced) -> None:
    tenancy = bounced.tenancy
    maker = tenancy.sessionmaker()
    mismatches: list[str] = []
    finished: list[int] = []
    committed: dict[str, set[str]] = {slug: set() for slug in SLUGS}
    served: dict[int, set[str]] = {}  # server backend pid -> tenants it served
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def check(n: int, i: int, slug: str, probe: tuple[object, ...], names: list[str], mine: set[str]) -> None:
        want = bounced.expected[slug]
        setting, user, schema, pid = probe
        where = f"thread {n} transaction {i} ({slug})"
        if setting != str(want.tenant.id):
            mismatches.append(f"{where}: app.current_tenant_id = {setting!r}")
        if user != want.user:
            mismatches.append(f"{where}: current_user = {user!r}, expected {want.user!r}")
        if schema != want.schema:
            mismatches.append(f"{where}: current_schema() = {schema!r}, expected {want.schema!r}")
        foreign = [name for name in names if not name.startswith(slug + "-")]
        if foreign:
            mismatches.append(f"{where}: sees other tenants' rows {foreign[:5]}")
        if not mine <= set(names):
            mismatches.append(f"{where}: misses its own committed rows {sorted(mine - set(names))[:5]}")
        assert isinstance(pid, int)
        with lock:
            served.setdefault(pid, set()).add(slug)

    def worker(n: int) -> None:
        rng = random.Random(n)
        order = list(SLUGS)
        rng.shuffle(order)  # every thread cycles through the tenants in its own order
        mine: dict[str, set[str]] = {slug: set() for slug in SLUGS}
        try:
            start.wait(timeout=30)
            for i in range(TRANSACTIONS):
                slug = order[i % len(order)]
                name = f"{slug}-{n}-{i}"
                fail = i % 7 == 3  # a statement fails mid-transaction, then rollback
                roll_back = i % 5 == 4  # insert, then roll back
                with tenant_context(slug):
                    if (n + i) % 2:
                        with maker() as s:
                            probe = tuple(s.execute(text(PROBE)).one())
                            names = list(s.scalars(select(Project.name)))
                            check(n, i, slug, probe, names, mine[slug])
                            s.add(Project(name=name))
                            s.flush()
                            if fail:
                                try:
                                    s.execute(text("select 1/0"))
                                    mismatches.append(f"thread {n} transaction {i}: 1/0 did not fail")
                                except exc.DBAPIError:
                                    pass
                            if fail or roll_back:
                                s.rollback()
                            else:
                                s.commit()
                                mine[slug].add(name)
                    else:
                        with tenancy.engine.connect() as conn:
                            probe = tuple(conn.execute(text(PROBE)).one())
                            names = list(conn.execute(select(Project.name)).scalars())
                            check(n, i, slug, probe, names, mine[slug])
                            conn.execute(insert(Project).values(name=name))
                            if fail:
                                try:
                                    conn.execute(text("select 1/0"))
                                    mismatches.append(f"thread {n} transaction {i}: 1/0 did not fail")
                                except exc.DBAPIError:
                                    pass
                            if fail or roll_back:
                                conn.rollback()
                            else:
                                conn.commit()
                                mine[slug].add(name)
            with lock:
                for slug, own in mine.items():
                    committed[slug] |= own
                finished.append(n)
        except Exception as error:  # noqa: BLE001 - reported after the join, with the others
            mismatches.append(f"thread {n} crashed: {error!r}")

    threads = [threading.Thread(target=worker, args=(n,), name=f"client-{n}") for n in range(THREADS)]
    began = time.monotonic()
    with ServerConnections(bounced) as monitor:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    elapsed = time.monotonic() - began

    assert not [t.name for t in threads if t.is_alive()], "client threads still running"
    assert mismatches == []
    assert sorted(finished) == list(range(THREADS))

    # PgBouncer multiplexed: 16 clients, at most POOL server connections, each serving several
    # tenants in turn (slack of one for a server connection being replaced).
    peak = max(monitor.samples, default=0)
    assert 1 <= peak <= POOL + 1, monitor.samples
    assert 1 <= len(served) <= POOL + 1, served
    assert any(len(slugs) > 1 for slugs in served.values()), served
    print(
        f"\n{THREADS} threads x {TRANSACTIONS} transactions in {elapsed:.1f} s; peak server "
        f"connections {peak} ({len(monitor.samples)} samples); backends {len(served)}"
    )

    # Every committed row is where its tenant's rows live, and nothing else is: checked through
    # the admin engine, directly on PostgreSQL and bypassing row-level security.
    total = sum(len(committed[s]) + len(bounced.seeded[s]) for s in SLUGS)
    found = 0
    with tenancy.admin_engine.connect() as admin:
        public = admin.execute(text("select tenant_id, name from public.projects")).all()
        by_tenant: dict[uuid.UUID, set[str]] = {}
        for tenant_id, name in public:
            by_tenant.setdefault(tenant_id, set()).add(name)
        found += len(public)
        assert set(by_tenant) <= {bounced.expected[s].tenant.id for s in SHARED}
        for slug in SHARED:
            rows = by_tenant.get(bounced.expected[slug].tenant.id, set())
            assert rows == bounced.seeded[slug] | committed[slug], slug
        for slug in SCHEMA:
            want = bounced.expected[slug]
            rows_ = admin.execute(
                text(f"select tenant_id, name from {quote_ident(want.schema)}.projects")
            ).all()
            found += len(rows_)
            assert {tenant_id for tenant_id, _ in rows_} == {want.tenant.id}, slug
            assert {name for _, name in rows_} == bounced.seeded[slug] | committed[slug], slug
    assert found == total
    # 1 in 5 rolled back, 1 in 7 failed: the rest committed
    per_thread = sum(1 for i in range(TRANSACTIONS) if i % 7 != 3 and i % 5 != 4)
    assert found - 3 * len(SLUGS) == THREADS * per_thread


def test_platform_reads_after_tenant_transactions_see_no_binding(bounced: Bounced) -> None:
    """An unbound transaction on the application engine (platform context) borrows server
    connections that just served tenants: it must find no tenant setting, the application role
    itself and the default ``search_path``, and no tenant's rows."""
    tenancy = bounced.tenancy
    app_role = bounced.server.app_role
    threads_n, rounds = 6, 30
    mismatches: list[str] = []
    finished: list[int] = []
    tenant_pids: set[int] = set()
    platform_pids: set[int] = set()
    lock = threading.Lock()
    start = threading.Barrier(threads_n)

    def worker(n: int) -> None:
        try:
            start.wait(timeout=30)
            for i in range(rounds):
                slug = SLUGS[(n + i) % len(SLUGS)]
                with tenant_context(slug), tenancy.engine.connect() as conn:
                    setting, _, _, pid = conn.execute(text(PROBE)).one()
                    if setting != str(bounced.expected[slug].tenant.id):
                        mismatches.append(f"thread {n} round {i} ({slug}): setting {setting!r}")
                    conn.commit()
                with lock:
                    tenant_pids.add(pid)
                with platform_context("check"), tenancy.engine.connect() as conn:
                    setting, user, path, schema, pid = conn.execute(
                        text(
                            "select current_setting('app.current_tenant_id', true), current_user, "
                            "current_setting('search_path'), current_schema(), pg_backend_pid()"
                        )
                    ).one()
                    visible = conn.execute(text("select count(*) from public.projects")).scalar_one()
                    conn.commit()
                where = f"thread {n} round {i} (after {slug})"
                if setting not in (None, ""):
                    mismatches.append(f"{where}: app.current_tenant_id = {setting!r}")
                if user != app_role:
                    mismatches.append(f"{where}: current_user = {user!r}")
                if path != '"$user", public' or schema != "public":
                    mismatches.append(f"{where}: search_path = {path!r}, current_schema() = {schema!r}")
                if visible != 0:
                    mismatches.append(f"{where}: {visible} tenant rows visible unbound")
                with lock:
                    platform_pids.add(pid)
            with lock:
                finished.append(n)
        except Exception as error:  # noqa: BLE001 - reported after the join
            mismatches.append(f"thread {n} crashed: {error!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not [t.name for t in threads if t.is_alive()], "threads still running"
    assert mismatches == []
    assert sorted(finished) == list(range(threads_n))
    # the platform reads really ran on the server connections the tenants had used
    assert len(platform_pids) >= 2 and platform_pids <= tenant_pids, (platform_pids, tenant_pids)
    assert len(tenant_pids) <= POOL + 1


# -- what a transaction leaves on a server connection -----------------------------------------------
#
# With one server connection behind PgBouncer, two client connections (each holding its own
# transaction in turn) share one PostgreSQL backend: what the first leaves there is what the second
# finds, although the second's client connection never served the first tenant. No memory kept on
# the client side can know that; the clearing sent with every tenant's BEGIN does.

LEFTOVERS = {
    "session settings": (
        ["set search_path to {schema}, public", "set role {role}", "set app.current_tenant_id = '{id}'"],
        "select current_user::text || ' ' || current_schema()::text || ' ' || "
        "current_setting('app.current_tenant_id')",
    ),
    "temporary table": (
        ["create temporary table leftover as select name from projects"],
        "select * from leftover",
    ),
    "holdable cursor": (
        ["declare leak cursor with hold for select name from projects"],
        "fetch all from leak",
    ),
    "listen": (["listen tenancy_leak"], "select pg_listening_channels()"),
    "advisory lock": (
        ["select pg_advisory_lock(4242)"],
        # the lock left behind (the transaction itself holds its tenant's serving lock)
        "select count(*) from pg_locks where locktype = 'advisory' "
        "and classid = 0 and objid = 4242 and pid = pg_backend_pid()",
    ),
}


@pytest.fixture
def single_server_connection(tenancy_server: TestServer, tenancy_database: str) -> Iterator[Tenancy]:
    """A Tenancy whose application engine reaches PostgreSQL through PgBouncer in transaction
    pooling with one server connection, a shared tenant ``alpha`` and a schema tenant ``charlie``,
    and ``TEMPORARY`` left to PUBLIC on the database (as its owner may have kept it)."""
    direct = tenancy_server.url(tenancy_database)
    assert direct.host is not None and direct.port is not None
    with PgBouncer(
        direct.host,
        direct.port,
        databases=[tenancy_database],
        users={tenancy_server.app_role: tenancy_server.app_password},
        pool_size=1,
        settings={"query_wait_timeout": "15"},
    ) as bouncer:
        tenancy = through(
            bouncer, tenancy_server, tenancy_database, pool_size=2, max_overflow=0, registry_ttl=5
        )
        try:
            tenancy.install()
            tenancy_server.execute(f"GRANT TEMPORARY ON DATABASE {quote_ident(tenancy_database)} TO PUBLIC")
            for slug, placement in (("alpha", "shared"), ("charlie", "schema")):
                tenancy.create_tenant(slug, placement=placement)
                with tenant_context(slug), tenancy.sessionmaker()() as s:
                    s.add(Project(name=f"{slug}-1"))
                    s.commit()
            yield tenancy
        finally:
            tenancy.dispose()


@pytest.mark.parametrize("leftover", sorted(LEFTOVERS))
@pytest.mark.parametrize(("first", "second"), [("charlie", "alpha"), ("alpha", "charlie")])
def test_nothing_left_on_a_server_connection_reaches_another_client(
    single_server_connection: Tenancy, leftover: str, first: str, second: str
) -> None:
    tenancy = single_server_connection
    prefix = tenancy.name_prefix
    ids = {slug: tenancy.get_tenant(slug).id for slug in (first, second)}
    leave, probe = LEFTOVERS[leftover]
    schema = f"{prefix}_{first}" if first == "charlie" else "public"
    with tenancy.engine.connect() as one, tenancy.engine.connect() as other:
        # Two client connections to PgBouncer, one server connection behind both. The second
        # serves its tenant once first: by its own account it is clean for that tenant.
        with tenant_context(second):
            other.execute(text("select 1"))
            other.commit()
        with tenant_context(first):
            pid = one.execute(text("select pg_backend_pid()")).scalar()
            for sql in leave:
                one.execute(
                    text(sql.format(schema=quote_ident(schema), role=f"{prefix}_charlie_app", id=ids[first]))
                )
            one.commit()
        with tenant_context(second):
            assert other.execute(text("select pg_backend_pid()")).scalar() == pid
            try:
                found = [tuple(r) for r in other.execute(text(probe))]
            except exc.DBAPIError as error:
                assert "does not exist" in str(error.orig)
                found = None
            other.rollback()
    expected = {
        "session settings": [
            (
                f"{prefix}_charlie_app {prefix}_charlie {ids[second]}"
                if second == "charlie"
                else f"{tenancy.url.username} public {ids[second]}",
            )
        ],
        "temporary table": None,
        "holdable cursor": None,
        "listen": [],
        "advisory lock": [(0,)],
    }[leftover]
    assert found == expected


# -- database tenants behind PgBouncer (tenant_poolers) -------------------------------------------


def test_database_tenants_through_pgbouncer_log_in_as_their_own_role_to_their_own_database(
    tenancy_factory: Callable[..., Tenancy], tenancy_server: TestServer
) -> None:
    """With ``tenant_poolers``, a database tenant's engine reaches its database through PgBouncer,
    still as its own role: PgBouncer authenticates each role with the server's own SCRAM verifier
    (``auth_query``) and logs in to the server with the keys the client proved (pass-through). A
    tenant role cannot reach another tenant's database through it."""
    direct = database_tenants(
        tenancy_factory, tenancy_server, ("pool_a", "pool_b"), tenant_scram_iterations=64
    )
    tenants = {slug: direct.get_tenant(slug) for slug in ("pool_a", "pool_b")}
    for slug in tenants:
        with tenant_context(slug), direct.sessionmaker()() as s:
            s.add(Project(name=f"{slug}-row"))
            s.commit()
    su = tenancy_server.superuser_url
    assert su.host is not None and su.port is not None and su.username and su.password
    with PgBouncer(
        su.host,
        su.port,
        databases=[str(t.location["database"]) for t in tenants.values()],
        users={su.username: su.password},
        pool_size=1,
        settings={"auth_query": "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"},
        database_settings={"auth_user": su.username},
    ) as bouncer:
        pooled = tenancy_factory(
            Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
            secret_key=SECRET,
            name_prefix=direct.name_prefix,  # the same tenants
            tenant_poolers={"main": f"postgresql://{bouncer.host}:{bouncer.port}"},
            engine_options={"connect_args": {"prepare_threshold": None}},
        )
        for slug, tenant in tenants.items():
            with tenant_context(slug), pooled.connect() as conn:
                url = conn.engine.url
                assert (url.host, url.port) == (bouncer.host, bouncer.port)
                user, database, pid = conn.execute(
                    text("select current_user, current_database(), pg_backend_pid()")
                ).one()
                assert (user, database) == (tenant.location["role"], tenant.location["database"])
                assert conn.execute(select(Project.name)).scalars().all() == [f"{slug}-row"]
                # the server session is PgBouncer's, shared with other clients, and the dialect
                # treats it so: it clears what others may have left before every binding
                driver = conn.connection.driver_connection
                assert pid != driver.info.backend_pid  # type: ignore[union-attr]
                assert conn.dialect._state(driver).shared_backend  # type: ignore[attr-defined]
        a, b = tenants["pool_a"], tenants["pool_b"]
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                host=bouncer.host,
                port=bouncer.port,
                user=str(a.location["role"]),
                password=derive_password(SECRET.encode(), str(a.location["role"])),
                dbname=str(b.location["database"]),
                connect_timeout=10,
            ).close()
        with pytest.raises(psycopg.OperationalError):  # a wrong password is refused by PgBouncer
            psycopg.connect(
                host=bouncer.host,
                port=bouncer.port,
                user=str(a.location["role"]),
                password="not-the-password",
                dbname=str(a.location["database"]),
                connect_timeout=10,
            ).close()
