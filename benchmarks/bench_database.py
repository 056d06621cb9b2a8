"""What database placement costs: provisioning, a foreign-table look-up, and many databases.

Every tenant measured here is a *database* tenant (``create_tenant(slug, placement="database")``): a
database of its own cloned from ``<prefix>_template`` (the tenant table ``projects``, with its
row-level security), a login role for the application, an FDW login role on the main database, and
the infrastructure schema ``auth`` (a tenant-scoped ``users`` table) imported as postgres_fdw
foreign tables. Three parts, selectable with ``--parts``:

``provision``
    N tenants (``--tenants``, default 50) created one after another, each ``create_tenant`` timed
    with ``perf_counter``: median, p90, min and max ms per tenant, and median x 1000 (a 1000-tenant
    fleet), read against the goal of <= 100 ms each. The split across provisioning steps comes from
    ``Tenancy._fault_injector``, called with each step's name before the step runs: the median time
    from one step's call to the next (``(lookup)`` is what precedes the first step: the leftover
    check and the advisory lock). For context, interleaved with them, the same storage made by hand
    as the superuser (``bare``): ``CREATE DATABASE ... TEMPLATE <prefix>_template`` on a pooled
    connection, then one new connection to the new database running ``CREATE SERVER``, ``CREATE
    USER MAPPING``, ``CREATE SCHEMA auth`` and ``IMPORT FOREIGN SCHEMA auth`` as one script (no
    roles, no grants, no registry row), alternating with them. Then, as a block of its own, N
    more with ``CREATE DATABASE ... STRATEGY FILE_COPY`` (``bare FILE_COPY``): the default
    ``WAL_LOG`` strategy writes the whole template (several MB of catalogs) to the WAL, FILE_COPY
    copies the files but checkpoints before and after, so it pays for whatever else left dirty
    buffers: interleaved with WAL_LOG creations it would pay for theirs.
``lookup``
    One transaction = ``tenant_context`` entered, a :class:`TenantSession` opened, one primary-key
    look-up (``select email from auth.users where id = :id``), commit, close. Variants:

    ``main``
        a shared tenant: ``auth.users`` is a table of the main database (the denominator);
    ``fdw``
        a database tenant: ``auth.users`` is a foreign table; the look-up goes through
        postgres_fdw to the main database (``WHERE id = ...`` is pushed down);
    ``local``
        context: the database tenant's own ``projects`` table, looked up the same way, no FDW hop.

    ``--users`` rows per tenant (default 5000) in ``auth.users`` and in the database tenant's
    ``projects``, analyzed, so the look-up is a real index scan. postgres_fdw keeps its remote
    connection per local connection (so per pooled connection): every variant is warmed up first.
    Then interleaved rounds whose order rotates, as ``benchmarks/bench_binding.py`` does: the median
    over rounds of the mean time per transaction, its ratio to ``main`` and the median of the
    per-round ratios (``paired``). Goal: fdw <= 2x main.
``roundrobin``
    ``--rr-tenants`` database tenants (default 200; part 1's are reused, missing ones created),
    ``--threads`` threads (default 4) running ``--rr-tx`` one-SELECT transactions in total
    (default 4000; ``select count(*) from projects`` through a TenantSession). Four variants: the
    transaction i goes to tenant i mod N (``roundrobin``: every tenant in turn, so with more tenants
    than cached engines every transaction misses the engine cache); to a tenant drawn from a Zipf
    distribution (``zipf``: tenant k with weight 1/k**1.1, a fixed seed per repeat, so the top 50 of
    200 get 81% of the transactions); to a ``hot`` set of 40 tenants in turn (they fit in every
    setup's cache); to ONE tenant (the denominator of the throughput ratios: with
    ``tenant_pool_size=1`` that is one connection for all the threads). Each variant runs in every
    ``--rr-setups`` setup (default all; the first is the reference), a Tenancy with
    ``tenant_pool_size=1``, ``tenant_max_overflow=0`` and, per setup, ``max_tenant_engines`` and
    ``max_tenant_connections``, the SCRAM iteration count of the tenant roles' verifiers (re-made
    with ``ALTER ROLE ... PASSWORD`` between runs as needed, same passwords), and whether the
    tenant engines go through a PgBouncer (``tenant_poolers``; transaction pooling,
    ``default_pool_size=1``, ``auth_file`` holding the roles' verifiers copied from ``pg_authid``;
    started for the run): ``filed`` (50 engines, budget 60, 4096 iterations: the configuration
    of the issue), ``scram1`` (the same with 1 iteration), ``bouncer`` (``scram1`` through
    PgBouncer), ``bouncer200`` (200 engines through PgBouncer), ``direct100`` and ``direct200``
    (100 and 200 engines, direct). Each run gets a fresh Tenancy (so the counters are its own), a
    warm-up (every tenant once, then transactions drawn like the timed ones), then the timed
    transactions. A monitor thread samples ``pg_stat_activity`` every few ms: connections to
    tenant databases (``datname like '<prefix>_%'``: PgBouncer's server connections, when there is
    one), and, separately, postgres_fdw's connections to the main database (``usename like
    '<prefix>_fdw_%'``; none are expected here, as only tenant tables are touched). Shown next to
    ``tenant_engines.stats()`` (the process's side) and the hit rate. ``--rr-repeats`` runs of each
    (setup, variant) (default 3), the order rotating; the summary gives medians, the ratio to one
    tenant of the same setup, the paired ratio (per repeat) and the ratio to every direct setup's
    one-tenant runs.

Run::

    python benchmarks/bench_database.py                       # everything (a few minutes)
    python benchmarks/bench_database.py --quick               # smoke run for CI (< 60 s)
    python benchmarks/bench_database.py --parts provision --tenants 200
    python benchmarks/bench_database.py --parts lookup --rounds 50 --per-round 400
    python benchmarks/bench_database.py --parts roundrobin --rr-tenants 300 --rr-tx 8000
    python benchmarks/bench_database.py --parts roundrobin --rr-setups filed,bouncer200

The server is a throwaway PostgreSQL cluster (``sqla_tenancy.testing.TestServer``, max_connections
300), or the superuser DSN in ``$SQLA_TENANCY_TEST_DSN``. This is a benchmark, not a test: it
asserts nothing about timings. Everything it creates shares a name prefix, and is dropped at the end.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from interleaved import Results
from sqlalchemy import Engine, Text, func, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_tenancy import Tenancy, TenantScoped, tenant_context
from sqla_tenancy.engines import EngineStats
from sqla_tenancy.identifiers import quote_ident, quote_literal
from sqla_tenancy.placements.database import derive_password, scram_verifier
from sqla_tenancy.testing import TestServer
from sqla_tenancy.testing.pgbouncer import PgBouncer

PARTS = ("provision", "lookup", "roundrobin")
STEPS = ("register", "template", "app_role", "database", "rename_database", "fdw_role", "fdw", "activate")
LOOKUP_VARIANTS = ("main", "fdw", "local")
RR_VARIANTS = ("roundrobin", "zipf", "hot", "one")
#: The exponent of the zipf variant's distribution.
ZIPF_S = 1.1
#: Hand-made storage for context: the suffix of its CREATE DATABASE.
BARE_VARIANTS = {"bare": "", "bare FILE_COPY": " STRATEGY FILE_COPY"}
SECRET = "sqla-tenancy benchmark secret key"
#: The goals the figures are read against.
PROVISION_GOAL_MS = 100.0
LOOKUP_GOAL_RATIO = 2.0
#: The round-robin part's Tenancy configuration.
RR_ENGINES = 50
RR_BUDGET = 60
HOT_TENANTS = 40
#: Seconds between two pg_stat_activity samples.
SAMPLE_INTERVAL = 0.005
#: The look-up part's tenants.
DB_TENANT = "lookdb"
SHARED_TENANT = "lookshared"


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class User(TenantScoped, Base):
    """Infrastructure: kept once, in the main database's ``auth`` schema."""

    __tablename__ = "users"
    __table_args__ = ({"schema": "auth"},)

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)


INFRASTRUCTURE = ("auth",)


# -- set-up ---------------------------------------------------------------------------------


@dataclass
class Fixture:
    """The server, the main database and the database tenants created so far (in order)."""

    server: TestServer
    database: str
    prefix: str
    tenancy: Tenancy
    slugs: list[str] = field(default_factory=list)
    #: the SCRAM iteration count the tenant roles' verifiers have, and for how many tenants
    iterations: dict[int, int] = field(default_factory=lambda: {4096: 1 << 30})

    @property
    def template(self) -> str:
        return f"{self.prefix}_template"

    def make_tenancy(self, **options: Any) -> Tenancy:
        """Another Tenancy on the same database, name prefix and secret (so the same tenants)."""
        return Tenancy(
            self.server.url(self.database),
            admin_url=self.server.url(self.database, role="admin"),
            metadata=Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
            secret_key=SECRET,
            name_prefix=self.prefix,
            create_database_strategy=self.tenancy.create_database_strategy,
            **options,
        )

    def ensure_tenants(self, count: int) -> float:
        """Create database tenants (untimed) until there are ``count``; returns the seconds taken."""
        start = time.perf_counter()
        while len(self.slugs) < count:
            slug = slug_for(len(self.slugs))
            self.tenancy.create_tenant(slug, placement="database")
            self.slugs.append(slug)
        return time.perf_counter() - start


def slug_for(number: int) -> str:
    return f"db{number:04d}"


def conninfo(url: URL) -> dict[str, Any]:
    return {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- part 1: provisioning -------------------------------------------------------------------


@dataclass
class Provisioning:
    tenant_ms: list[float] = field(default_factory=list)
    bare_ms: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in BARE_VARIANTS})
    steps_ms: dict[str, list[float]] = field(default_factory=dict)


def bare_create(fx: Fixture, name: str, variant: str) -> None:
    """The storage of a database tenant made by hand, as the superuser: the floor for context."""
    with fx.server.superuser.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(fx.template)}{BARE_VARIANTS[variant]}"
        )
    main = fx.server.url(fx.database, role="admin")
    script = ";\n".join(
        [
            "CREATE SERVER bare_main FOREIGN DATA WRAPPER postgres_fdw OPTIONS ("
            f"host {quote_literal(main.host or 'localhost')}, port {quote_literal(str(main.port))}, "
            f"dbname {quote_literal(fx.database)})",
            "CREATE USER MAPPING FOR CURRENT_USER SERVER bare_main OPTIONS ("
            f"user {quote_literal(main.username or '')}, password {quote_literal(main.password or '')})",
            "CREATE SCHEMA auth",
            "IMPORT FOREIGN SCHEMA auth FROM SERVER bare_main INTO auth",
        ]
    )
    with psycopg.connect(**conninfo(fx.server.superuser_url.set(database=name)), autocommit=True) as conn:
        conn.execute(script.encode())  # no parameters: one simple-protocol query


def run_provision(fx: Fixture, count: int) -> Provisioning:
    result = Provisioning(steps_ms={name: [] for name in ("(lookup)", *STEPS)})
    perf = time.perf_counter
    marks: list[tuple[str, float]] = []
    order = ("tenancy", "bare")

    def record(step: str) -> None:
        marks.append((step, perf()))

    fx.tenancy._fault_injector = record
    try:
        for i in range(count):
            slug = slug_for(len(fx.slugs))
            gc.collect()
            # Alternate the order, so that neither always follows the other.
            shift = i % len(order)
            for which in order[shift:] + order[:shift]:
                if which == "bare":
                    start = perf()
                    bare_create(fx, f"{fx.prefix}_bare_{i:04d}", which)
                    result.bare_ms[which].append((perf() - start) * 1000)
                    continue
                marks.clear()
                start = perf()
                fx.tenancy.create_tenant(slug, placement="database")
                end = perf()
                fx.slugs.append(slug)
                result.tenant_ms.append((end - start) * 1000)
                if [m[0] for m in marks] != list(STEPS):
                    raise SystemExit(f"unexpected provisioning steps {[m[0] for m in marks]}")
                bounds = [start, *(m[1] for m in marks), end]
                for name, (a, b) in zip(("(lookup)", *STEPS), itertools.pairwise(bounds), strict=True):
                    result.steps_ms[name].append((b - a) * 1000)
    finally:
        fx.tenancy._fault_injector = None
    for i in range(count):
        gc.collect()
        start = perf()
        bare_create(fx, f"{fx.prefix}_bare_fc_{i:04d}", "bare FILE_COPY")
        result.bare_ms["bare FILE_COPY"].append((perf() - start) * 1000)
    return result


def print_provision(result: Provisioning) -> None:
    times = result.tenant_ms
    n = len(times)
    median = statistics.median(times)
    print(f"\nprovision: {n} database tenants, one after another (create_tenant, perf_counter)")
    print(f"  {'':<22} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}   ms")
    rows = {
        "create_tenant": times,
        "bare (interleaved)": result.bare_ms["bare"],
        "bare FILE_COPY (block)": result.bare_ms["bare FILE_COPY"],
    }
    for label, values in rows.items():
        if values:
            print(
                f"  {label:<22} {statistics.median(values):8.1f} {percentile(values, 0.9):8.1f} "
                f"{min(values):8.1f} {max(values):8.1f}"
            )
    if n >= 20:
        print(
            f"  drift: median of the first 10 {statistics.median(times[:10]):.1f} ms, "
            f"of the last 10 {statistics.median(times[-10:]):.1f} ms"
        )
    verdict = "meets" if median <= PROVISION_GOAL_MS else "MISSES"
    print(
        f"  goal <= {PROVISION_GOAL_MS:.0f} ms each: median {median:.1f} ms ({verdict} it); "
        f"1000 tenants ~ median x 1000 = {median:.0f} s ({median / 60:.1f} min)"
    )
    ratios = ", ".join(f"/ {v} = {median / statistics.median(ms):.2f}" for v, ms in result.bare_ms.items())
    print(f"  create_tenant {ratios}")
    total = sum(statistics.median(v) for v in result.steps_ms.values())
    print("  per step (from its _fault_injector call to the next; medians)")
    print(f"    {'step':<10} {'median':>8} {'p90':>8} {'max':>8} {'share':>7}")
    for name, values in result.steps_ms.items():
        med = statistics.median(values)
        print(
            f"    {name:<10} {med:8.1f} {percentile(values, 0.9):8.1f} {max(values):8.1f} "
            f"{100 * med / total:6.1f}%"
        )


# -- part 2: foreign-table look-up vs main ----------------------------------------------------

Tx = Callable[[int], None]


@dataclass
class LookupFixture:
    ids: dict[str, list[int]]  # per variant: the primary keys it looks up
    other_user: dict[str, int]  # per tenant slug: a users id of the other tenant
    remote_sql: str
    fdw_connections: int = 0


def seed_lookup(fx: Fixture, rows: int) -> LookupFixture:
    """The two tenants, ``rows`` users each (main database) and ``rows`` projects in the database
    tenant's own database; statistics up to date."""
    tenancy = fx.tenancy
    db_tenant = tenancy.create_tenant(DB_TENANT, placement="database")
    shared = tenancy.create_tenant(SHARED_TENANT)
    users: dict[str, list[int]] = {}
    with tenancy.admin_engine.begin() as conn:
        for tenant in (db_tenant, shared):
            users[tenant.slug] = list(
                conn.execute(
                    text(
                        "insert into auth.users (tenant_id, email) select :t, 'user' || g || '@' || :s "
                        "|| '.test' from generate_series(1, :n) g returning id"
                    ),
                    {"t": tenant.id, "s": tenant.slug, "n": rows},
                ).scalars()
            )
    with tenant_context(DB_TENANT), tenancy.sessionmaker()() as s:
        projects = list(
            s.scalars(
                insert(Project).returning(Project.id),
                [{"name": f"project-{i}"} for i in range(rows)],
            )
        )
        s.commit()
    fx.server.execute("ANALYZE auth.users", database=fx.database)
    fx.server.execute("ANALYZE projects", database=db_tenant.location["database"])
    with tenant_context(DB_TENANT), tenancy.connect() as conn:
        plan = conn.execute(
            text("explain verbose select email from auth.users where id = :id"), {"id": users[DB_TENANT][0]}
        ).scalars()
        remote = next((line.strip() for line in plan if "Remote SQL" in line), "(no Remote SQL line)")
    return LookupFixture(
        ids={"main": users[SHARED_TENANT], "fdw": users[DB_TENANT], "local": projects},
        other_user={DB_TENANT: users[SHARED_TENANT][0], SHARED_TENANT: users[DB_TENANT][0]},
        remote_sql=remote,
    )


def lookup_variants(tenancy: Tenancy) -> dict[str, Tx]:
    maker = tenancy.sessionmaker()

    def user_tx(slug: str) -> Tx:
        def tx(pk: int) -> None:
            with tenant_context(slug), maker() as s:
                s.scalar(select(User.email).where(User.id == pk))
                s.commit()

        return tx

    def local_tx(pk: int) -> None:
        with tenant_context(DB_TENANT), maker() as s:
            s.scalar(select(Project.name).where(Project.id == pk))
            s.commit()

    return {"main": user_tx(SHARED_TENANT), "fdw": user_tx(DB_TENANT), "local": local_tx}


def check_lookup(tenancy: Tenancy, lf: LookupFixture) -> None:
    """Each variant finds its own row and not the other tenant's (RLS through the FDW included)."""
    maker = tenancy.sessionmaker()
    for variant, slug in (("main", SHARED_TENANT), ("fdw", DB_TENANT)):
        with tenant_context(slug), maker() as s:
            mine = s.scalar(select(User.email).where(User.id == lf.ids[variant][0]))
            theirs = s.scalar(select(User.email).where(User.id == lf.other_user[slug]))
        if mine is None or theirs is not None:
            raise SystemExit(
                f"{variant}: own row {mine is not None}, other tenant's row {theirs is not None}"
            )
    with tenant_context(DB_TENANT), maker() as s:
        if s.scalar(select(Project.name).where(Project.id == lf.ids["local"][0])) is None:
            raise SystemExit("local: the database tenant's project is missing")


def fdw_connection_count(fx: Fixture) -> int:
    with fx.server.superuser.connect() as conn:
        return int(
            conn.execute(
                text(
                    "select count(*) from pg_stat_activity where datname = :d and usename like :f "
                    "and backend_type = 'client backend'"
                ),
                {"d": fx.database, "f": f"{fx.prefix}\\_fdw\\_%"},
            ).scalar_one()
        )


def run_lookup(fx: Fixture, lf: LookupFixture, rounds: int, per_round: int, warmup: int) -> Results:
    tenancy = fx.tenancy
    check_lookup(tenancy, lf)
    variants = lookup_variants(tenancy)
    rng = random.Random(42)
    ids = {v: rng.sample(lf.ids[v], len(lf.ids[v])) for v in LOOKUP_VARIANTS}
    for variant, tx in variants.items():
        for i in range(warmup):
            tx(ids[variant][i % len(ids[variant])])
    lf.fdw_connections = fdw_connection_count(fx)
    results = Results(LOOKUP_VARIANTS, "main")
    perf = time.perf_counter_ns
    for round_no in range(rounds):
        for variant in results.order(round_no):
            pool = ids[variant]
            base = round_no * per_round
            batch = [pool[(base + i) % len(pool)] for i in range(per_round)]
            tx = variants[variant]
            gc.collect()
            start = perf()
            for pk in batch:
                tx(pk)
            elapsed = perf() - start
            results.per_round[variant].append(elapsed / per_round / 1000)
    return results


def print_lookup(lf: LookupFixture, results: Results, rounds: int, per_round: int, rows: int) -> None:
    print(
        f"\nlookup: {rounds} rounds x {per_round} transactions, {rows} users rows per tenant, "
        "median of per-round means"
    )
    print(f"  fdw plan: {lf.remote_sql}")
    print(f"  postgres_fdw connections to the main database after warm-up: {lf.fdw_connections}")
    results.print_rows()
    ratio = results.ratio("fdw")
    verdict = "meets" if ratio <= LOOKUP_GOAL_RATIO else "MISSES"
    print(
        f"  goal fdw <= {LOOKUP_GOAL_RATIO:.0f}x main: {ratio:.2f}x (paired {results.paired('fdw'):.2f}x) "
        f"({verdict} it); fdw - main = {results.median('fdw') - results.median('main'):.0f} µs per look-up"
    )


# -- part 3: round-robin over many database tenants ------------------------------------------


class ConnectionMonitor:
    """Samples pg_stat_activity in a thread: the peak of connections to tenant databases, and of
    postgres_fdw's connections to the main database."""

    def __init__(self, engine: Engine, prefix: str, main_database: str) -> None:
        self.engine = engine
        self.prefix = prefix
        self.main_database = main_database
        self.peak_tenant = 0
        self.peak_fdw = 0
        self.samples = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def _run(self) -> None:
        query = text(
            "select count(*) filter (where datname like :t), "
            "count(*) filter (where datname = :m and usename like :f) "
            "from pg_stat_activity where backend_type = 'client backend'"
        )
        params = {"t": f"{self.prefix}\\_%", "m": self.main_database, "f": f"{self.prefix}\\_fdw\\_%"}
        try:
            with self.engine.connect() as conn:
                self._ready.set()
                while not self._stop.is_set():
                    # pg_stat_activity is a snapshot per transaction: read it outside one.
                    tenant, fdw = conn.execute(query, params).one()
                    self.peak_tenant = max(self.peak_tenant, int(tenant))
                    self.peak_fdw = max(self.peak_fdw, int(fdw))
                    self.samples += 1
                    self._stop.wait(SAMPLE_INTERVAL)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._error = exc
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(timeout=10)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error


@dataclass
class RRRun:
    setup: str
    variant: str
    tenants: int
    transactions: int
    seconds: float
    hits: int
    misses: int
    evictions: int
    passed_over: int
    stats: EngineStats
    peak_tenant: int
    peak_fdw: int
    samples: int

    @property
    def throughput(self) -> float:
        return self.transactions / self.seconds

    @property
    def hit_rate(self) -> float:
        """Percent of the timed transactions whose engine was in the cache."""
        return 100 * self.hits / max(1, self.hits + self.misses)


def transaction_plan(variant: str, slugs: Sequence[str], transactions: int, seed: int) -> list[str]:
    """The tenant of each transaction: in turn (``roundrobin``, ``hot``, ``one``), or drawn from
    the Zipf distribution (``zipf``: tenant k of N with weight 1 / k**ZIPF_S, a fixed seed)."""
    if variant == "zipf":
        rng = random.Random(seed)
        return rng.choices(slugs, weights=zipf_weights(len(slugs)), k=transactions)
    n = len(slugs)
    return [slugs[i % n] for i in range(transactions)]


def zipf_weights(count: int) -> list[float]:
    return [1 / (k**ZIPF_S) for k in range(1, count + 1)]


def zipf_share(count: int, top: int) -> float:
    """The share of the transactions that goes to the ``top`` most frequent of ``count`` tenants."""
    weights = zipf_weights(count)
    return sum(weights[:top]) / sum(weights)


def run_transactions(tenancy: Tenancy, plan: Sequence[str], threads: int) -> float:
    """The one-SELECT transactions of ``plan`` (transaction i on tenant ``plan[i]``) from
    ``threads`` threads; returns the seconds from the common start to the last one's end.

    The threads take the next transaction number from one shared counter, so the tenants are
    visited in the plan's order whatever each thread's pace (with a fixed share per thread, the
    threads drift apart and revisit each other's recent tenants: cache hits a strict round-robin
    never gets)."""
    maker = tenancy.sessionmaker()
    statement = select(func.count()).select_from(Project)
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    transactions = len(plan)
    counter = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        try:
            barrier.wait(timeout=60)
            while (i := next(counter)) < transactions:
                with tenant_context(plan[i]), maker() as s:
                    s.scalar(statement)
                    s.commit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, name=f"bench-{k}") for k in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=60)
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


@dataclass(frozen=True)
class Setup:
    """How the round-robin part's Tenancy reaches its tenants."""

    name: str
    #: max_tenant_engines and max_tenant_connections (tenant_pool_size=1, tenant_max_overflow=0)
    engines: int
    budget: int
    #: the PBKDF2 iteration count of the tenant roles' SCRAM verifiers
    iterations: int
    #: tenant engines connect through a PgBouncer (transaction pooling) instead of directly
    pooler: bool = False
    about: str = ""


SETUPS = {
    s.name: s
    for s in (
        Setup("filed", RR_ENGINES, RR_BUDGET, 4096, about="as the issue was filed"),
        Setup("scram1", RR_ENGINES, RR_BUDGET, 1, about="verifiers of 1 iteration"),
        Setup(
            "bouncer",
            RR_ENGINES,
            RR_BUDGET,
            1,
            pooler=True,
            about="through PgBouncer, 50 engines: a miss reconnects to PgBouncer, no new backend",
        ),
        Setup(
            "bouncer200",
            200,
            200,
            1,
            pooler=True,
            about="through PgBouncer, an engine per tenant: client connections are cheap",
        ),
        Setup("direct100", 100, 100, 1, about="room for half the tenants, direct"),
        Setup("direct200", 200, 200, 1, about="an engine (one connection) per tenant, direct"),
    )
}


def set_role_iterations(fx: Fixture, slugs: Sequence[str], iterations: int) -> None:
    """Give the tenants' login roles SCRAM verifiers of ``iterations`` (same passwords)."""
    if fx.iterations.get(iterations) == len(slugs):
        return
    secret = fx.tenancy.config.secret()
    with fx.server.superuser.connect() as conn:
        for slug in slugs:
            role = str(fx.tenancy.get_tenant(slug).location["role"])
            verifier = scram_verifier(derive_password(secret, role), iterations=iterations)
            conn.exec_driver_sql(f"ALTER ROLE {quote_ident(role)} PASSWORD {quote_literal(verifier)}")
        conn.commit()
    fx.iterations = {iterations: len(slugs)}


def start_bouncer(fx: Fixture, slugs: Sequence[str]) -> PgBouncer:
    """A PgBouncer in transaction pooling in front of the tenant databases. Each tenant role logs
    in to PgBouncer, and through it to its own database, as itself: PgBouncer's ``auth_file``
    holds the roles' SCRAM verifiers, copied from ``pg_authid`` (never a password), and PgBouncer
    passes the keys the client proved through to the server. (``auth_query`` would work too, but
    it runs in the database the client asks for, so each login needs a server connection of the
    ``auth_user`` to that database besides the tenant's own.)"""
    su = fx.server.superuser_url
    tenants = [fx.tenancy.get_tenant(slug) for slug in slugs]
    roles = [str(t.location["role"]) for t in tenants]
    with fx.server.superuser.connect() as conn:
        verifiers = dict(
            conn.execute(
                text("select rolname, rolpassword from pg_authid where rolname = any(:r)"), {"r": roles}
            ).all()
        )
    return PgBouncer(
        su.host or "127.0.0.1",
        su.port or 5432,
        databases=[str(t.location["database"]) for t in tenants],
        users=verifiers,
        pool_size=1,
        max_client_conn=1000,
    ).start()


def run_rr_once(
    fx: Fixture, setup: Setup, variant: str, plans: tuple[list[str], list[str]], threads: int
) -> RRRun:
    warmup, plan = plans
    set_role_iterations(fx, fx.slugs, setup.iterations)
    bouncer = start_bouncer(fx, sorted(set(warmup) | set(plan))) if setup.pooler else None
    options: dict[str, Any] = {}
    if bouncer is not None:
        options["tenant_poolers"] = {"main": f"postgresql://{bouncer.host}:{bouncer.port}"}
        # PgBouncer 1.18 does not follow protocol-level prepared statements (see docs/placements.md)
        options["engine_options"] = {"connect_args": {"prepare_threshold": None}}
    tenancy = fx.make_tenancy(
        max_tenant_engines=setup.engines,
        tenant_pool_size=1,
        tenant_max_overflow=0,
        max_tenant_connections=setup.budget,
        **options,
    )
    try:
        run_transactions(tenancy, warmup, threads)
        before = tenancy.tenant_engines.stats()
        monitor = ConnectionMonitor(fx.server.superuser, fx.prefix, fx.database)
        monitor.start()
        try:
            gc.collect()
            seconds = run_transactions(tenancy, plan, threads)
        finally:
            monitor.stop()
        after = tenancy.tenant_engines.stats()
        return RRRun(
            setup=setup.name,
            variant=variant,
            tenants=len(set(plan)),
            transactions=len(plan),
            seconds=seconds,
            hits=after.hits - before.hits,
            misses=after.misses - before.misses,
            evictions=after.evictions - before.evictions,
            passed_over=after.passed_over - before.passed_over,
            stats=after,
            peak_tenant=monitor.peak_tenant,
            peak_fdw=monitor.peak_fdw,
            samples=monitor.samples,
        )
    finally:
        tenancy.dispose()
        if bouncer is not None:
            bouncer.stop()


def run_roundrobin(
    fx: Fixture, setups: Sequence[Setup], count: int, transactions: int, threads: int, repeats: int
) -> list[RRRun]:
    slugs = fx.slugs[:count]
    sets = {
        "roundrobin": slugs,
        "zipf": slugs,
        "hot": slugs[: min(HOT_TENANTS, count)],
        "one": slugs[:1],
    }
    runs: list[RRRun] = []
    arms = [(setup, variant) for setup in setups for variant in RR_VARIANTS]
    for repeat in range(repeats):
        shift = repeat % len(arms)
        for setup, variant in arms[shift:] + arms[:shift]:
            tenants = sets[variant]
            # every tenant once (its engine made, as in a process that has run for a while), then
            # a warm-up drawn like the timed transactions
            warmup = list(tenants) + transaction_plan(
                variant, tenants, max(len(tenants), 10 * threads), seed=repeat
            )
            plan = transaction_plan(variant, tenants, transactions, seed=1000 + repeat)
            runs.append(run_rr_once(fx, setup, variant, (warmup, plan), threads))
    return runs


def paired_ratios(runs: Sequence[RRRun], variant: str) -> list[float]:
    """Per repeat, the variant's throughput over the one-tenant run's (runs of one setup, in the
    order they were made: the n-th run of a variant belongs to the n-th repeat)."""
    mine = [r.throughput for r in runs if r.variant == variant]
    ones = [r.throughput for r in runs if r.variant == "one"]
    return [a / b for a, b in zip(mine, ones, strict=True)]


def print_roundrobin(runs: list[RRRun], setups: Sequence[Setup], threads: int, transactions: int) -> None:
    print(
        f"\nroundrobin: {transactions} one-SELECT transactions from {threads} threads per run; "
        "Tenancy(tenant_pool_size=1, tenant_max_overflow=0, max_tenant_engines=E, "
        "max_tenant_connections=B) per setup:"
    )
    for setup in setups:
        print(
            f"  {setup.name:<10} E={setup.engines} B={setup.budget}, SCRAM {setup.iterations} "
            f"iteration(s){', through PgBouncer' if setup.pooler else ''}: {setup.about}"
        )
    print(
        f"  zipf: s={ZIPF_S} over the tenants (top {RR_ENGINES} of 200 get "
        f"{100 * zipf_share(200, RR_ENGINES):.0f}% of the transactions)"
    )
    print(
        "  counters: hits/misses/evictions/passed over (misses served by an engine not kept) of the "
        "timed transactions, hit rate; engines, open and "
        "peak (cache peak_connections, since the Tenancy was made) from tenant_engines.stats();"
    )
    print(
        "  sampled: peak connections seen in pg_stat_activity during the timed transactions, to tenant "
        "databases (PgBouncer's server connections, when there is one) / postgres_fdw's to the main "
        "database"
    )
    header = (
        f"  {'setup':<10} {'variant':<10} {'tenants':>7} {'s':>7} {'tx/s':>8} {'hits':>6} {'misses':>6} "
        f"{'hit%':>5} {'evict':>6} {'passed':>6} {'engines':>7} {'open':>5} {'peak':>5} "
        f"{'sampled':>8} {'fdw':>4}"
    )
    print(header)
    for run in sorted(runs, key=lambda r: (r.setup, RR_VARIANTS.index(r.variant))):
        s = run.stats
        print(
            f"  {run.setup:<10} {run.variant:<10} {run.tenants:7d} {run.seconds:7.2f} {run.throughput:8.1f} "
            f"{run.hits:6d} {run.misses:6d} {run.hit_rate:5.1f} {run.evictions:6d} {run.passed_over:6d} "
            f"{s.engines:7d} "
            f"{s.open_connections:5d} {s.peak_connections:5d} {run.peak_tenant:8d} {run.peak_fdw:4d}"
        )
    direct_one = [r.throughput for r in runs if r.variant == "one" and not SETUPS[r.setup].pooler]
    baseline = statistics.median(direct_one) if direct_one else float("nan")
    print(
        "  medians over runs. Ratios to one tenant: of the same setup (median / median), paired (the "
        "median over repeats of the ratio to the same repeat's one-tenant run), and [to the median of "
        f"every direct setup's one-tenant runs, {baseline:.0f} tx/s: one tenant never misses, so those "
        "setups do not differ there]"
    )
    for setup in setups:
        mine = [r for r in runs if r.setup == setup.name]
        medians = {v: statistics.median(r.throughput for r in mine if r.variant == v) for v in RR_VARIANTS}
        hit = {v: statistics.median(r.hit_rate for r in mine if r.variant == v) for v in RR_VARIANTS}
        paired = {v: statistics.median(paired_ratios(mine, v)) for v in RR_VARIANTS}
        ratios = ", ".join(
            f"{v} {medians[v] / medians['one']:.3f} paired {paired[v]:.3f} [{medians[v] / baseline:.3f}] "
            f"({hit[v]:.0f}% hits)"
            for v in RR_VARIANTS
            if v != "one"
        )
        peak_cache = max(r.stats.peak_connections for r in mine)
        peak_sampled = max(r.peak_tenant for r in mine)
        print(f"  {setup.name:<10} one {medians['one']:.0f} tx/s; {ratios}")
        print(
            f"  {'':<10} connections: budget {setup.budget} in the process, cache peak {peak_cache}; "
            f"server-side peak sampled {peak_sampled}; postgres_fdw peak {max(r.peak_fdw for r in mine)}"
        )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default all)"
    )
    parser.add_argument("--tenants", type=int, default=None, help="tenants provisioned (default 50)")
    parser.add_argument("--rr-tenants", type=int, default=None, help="round-robin tenants (default 200)")
    parser.add_argument("--rr-tx", type=int, default=None, help="transactions per round-robin run (4000)")
    parser.add_argument("--rr-repeats", type=int, default=None, help="runs of each round-robin variant (3)")
    parser.add_argument("--threads", type=int, default=4, help="round-robin threads (default 4)")
    parser.add_argument(
        "--rr-setups",
        default="filed,scram1,bouncer,bouncer200,direct100,direct200",
        help=f"comma-separated round-robin setups, the first the reference (from {','.join(SETUPS)})",
    )
    parser.add_argument("--rounds", type=int, default=None, help="look-up rounds (default 30)")
    parser.add_argument(
        "--per-round", type=int, default=None, help="look-ups per variant a round (default 200)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up look-ups per variant (300)")
    parser.add_argument("--users", type=int, default=None, help="users rows per look-up tenant (5000)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run for CI (< 60 s)")
    parser.add_argument(
        "--create-strategy",
        choices=["file_copy", "wal_log"],
        default=None,
        help="Tenancy(create_database_strategy=...) (default: the server's)",
    )
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(
            f"--parts: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}"
        )
    args.parts = [p for p in PARTS if p in parts]
    args.rr_setups = [n.strip() for n in args.rr_setups.split(",") if n.strip()]
    unknown = sorted(set(args.rr_setups) - set(SETUPS))
    if unknown or not args.rr_setups:
        parser.error(
            f"--rr-setups: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SETUPS)}"
        )
    defaults = {
        "tenants": (8, 50),
        "rr_tenants": (60, 200),
        "rr_tx": (600, 4000),
        "rr_repeats": (1, 3),
        "rounds": (3, 30),
        "per_round": (50, 200),
        "warmup": (50, 300),
        "users": (2000, 5000),
    }
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    positive = ("tenants", "rr_tenants", "rr_tx", "rr_repeats", "threads", "rounds", "per_round", "users")
    if any(getattr(args, name) < 1 for name in positive) or args.warmup < 0:
        parser.error("counts must be positive (--warmup non-negative)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # The throwaway cluster holds the benchmark's other databases, open to PUBLIC: provisioning's
    # warning about each one a tenant role could open is right, and noise here.
    logging.getLogger("sqla_tenancy.isolation").setLevel(logging.ERROR)
    args = parse_args(argv)
    started = time.monotonic()
    server = TestServer.start()
    tenancy: Tenancy | None = None
    try:
        database = server.create_database()
        prefix = server.name_prefix(database)
        tenancy = Tenancy(
            server.url(database),
            admin_url=server.url(database, role="admin"),
            metadata=Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
            secret_key=SECRET,
            name_prefix=prefix,
            create_database_strategy=args.create_strategy,
        )
        tenancy.install()
        start = time.perf_counter()
        tenancy.prepare_server(server.superuser_url)
        prepare_ms = (time.perf_counter() - start) * 1000
        fx = Fixture(server, database, prefix, tenancy)
        with server.superuser.connect() as conn:
            version = conn.execute(text("show server_version")).scalar_one()
            max_connections = conn.execute(text("show max_connections")).scalar_one()
        print(
            f"sqla-tenancy database-placement benchmark: python {sys.version.split()[0]}, PostgreSQL "
            f"{version} (max_connections {max_connections}), "
            f"{'$SQLA_TENANCY_TEST_DSN' if server.cluster is None else 'temporary cluster'}, "
            f"parts {','.join(args.parts)}{' (quick)' if args.quick else ''}"
        )
        print(f"prepare_server (one-time: template database, postgres_fdw): {prepare_ms:.0f} ms")
        summary: list[str] = []
        if "provision" in args.parts:
            provisioning = run_provision(fx, args.tenants)
            print_provision(provisioning)
            summary.append(f"provision median {statistics.median(provisioning.tenant_ms):.0f} ms/tenant")
        if "lookup" in args.parts:
            lf = seed_lookup(fx, args.users)
            results = run_lookup(fx, lf, args.rounds, args.per_round, args.warmup)
            print_lookup(lf, results, args.rounds, args.per_round, args.users)
            summary.append(f"lookup fdw/main = {results.ratio('fdw'):.2f}")
            # Close the look-up tenant's pool (and with it its postgres_fdw connection).
            tenancy.tenant_engines.clear()
        if "roundrobin" in args.parts:
            missing = max(0, args.rr_tenants - len(fx.slugs))
            seconds = fx.ensure_tenants(args.rr_tenants)
            if missing:
                print(f"\n(created {missing} more database tenants for roundrobin in {seconds:.1f} s)")
            setups = [SETUPS[name] for name in args.rr_setups]
            if not PgBouncer.available() and any(s.pooler for s in setups):
                print("\n(no pgbouncer binary: the setups through PgBouncer are left out)")
                setups = [s for s in setups if not s.pooler]
            runs = run_roundrobin(fx, setups, args.rr_tenants, args.rr_tx, args.threads, args.rr_repeats)
            print_roundrobin(runs, setups, args.threads, args.rr_tx)
            for setup in setups:
                mine = [r for r in runs if r.setup == setup.name]
                one = statistics.median(r.throughput for r in mine if r.variant == "one")
                ratios = "/".join(
                    f"{statistics.median(r.throughput for r in mine if r.variant == v) / one:.2f}"
                    for v in ("zipf", "roundrobin")
                )
                summary.append(f"{setup.name} zipf/rr vs one = {ratios}")
        print()
        print("  ".join(summary))
        print(f"(total {time.monotonic() - started:.1f} s)")
        return 0
    finally:
        try:
            if tenancy is not None:
                tenancy._fault_injector = None
                tenancy.dispose()
        finally:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
