"""What binding a tenant costs per transaction, measured side by side in one run.

One transaction = open a session, one primary-key SELECT of a tenant-scoped row, commit, close.
Three variants, all connected as the same application role (NOSUPERUSER NOBYPASSRLS), so the
row-level-security work PostgreSQL does is identical:

``tenancy``
    a :class:`TenantSession` from ``Tenancy.sessionmaker()`` inside ``tenant_context("acme")``
    (shared placement): the dialect sends ``BEGIN; SET LOCAL app.current_tenant_id = '...'`` as one
    simple-protocol query. ``tenant_context`` is entered per transaction, as a web request would.
``switching``
    the same, but alternating between two tenants every transaction on one pool, as a server
    of many tenants does: each transaction is bound to another tenant than its connection's
    previous one, so the dialect also clears what that one may have left on the connection
    (``CLOSE ALL; UNLISTEN *; ...; COMMIT`` in front of ``BEGIN``, see
    :mod:`sqla_tenancy.binding`). ``tenancy`` measures the same tenant again, where that is left
    out.
``limit``
    a plain ``Session`` on a plain ``postgresql+psycopg`` engine whose connections carry the tenant
    from connect time (``options=-c app.current_tenant_id=<uuid>``): the same RLS work with no
    per-transaction binding cost. This is the denominator of every ratio.
``naive``
    a plain engine with a ``begin`` event running ``select set_config(..., true)`` after psycopg's
    own ``BEGIN`` (one extra round trip per transaction), for context.

Two more sync variants split ``tenancy``'s cost into its parts: a plain ``Session`` on an engine of
sqla-tenancy's dialect whose binder always returns the tenant's binding, with no routing, no
``tenant_context`` and no pre-ping:

``pins``
    the shared placement's pins alone (``BEGIN; SET LOCAL search_path = DEFAULT; SET LOCAL ROLE
    NONE; SET LOCAL app.current_tenant_id = ...``): what the one-round-trip binding costs the
    server and the dialect;
``admitted``
    the same with the admission (``CALL tenancy.admit(<uuid>, 'shared')``) between the role and
    the tenant setting, exactly what ``tenancy`` sends.

``tenancy`` - ``admitted`` is then the Python side: ``tenant_context``, the router, the
``TenantSession`` and the pool's pre-ping.

The database placement is measured apart (sync), against a limit of its own:

``database``
    a :class:`TenantSession` inside ``tenant_context("dbacme")``, a database tenant: the session
    gets the tenant's engine (its own pool, on its own database) from the engine cache.
``db_limit``
    a plain ``Session`` on a plain engine connected to that database as the tenant's role, the
    tenant carried from connect time, as ``limit`` is for the main database.

Each variant is warmed up, then timed in interleaved rounds (the order rotates every round); the
table shows the median over rounds of the mean time per transaction, and its ratio to ``limit``.
The ``paired`` column is the median of the per-round ratios, which is steadier on a noisy machine.

Run::

    python benchmarks/bench_binding.py                 # 30 rounds x 200 transactions
    python benchmarks/bench_binding.py --quick         # smoke run, a few seconds
    python benchmarks/bench_binding.py --rounds 50 --per-round 400
    python benchmarks/bench_binding.py --statements 5  # five SELECTs (of other rows) a transaction

The binding is paid once a transaction, so ``--statements`` shows what it is worth to a
transaction that does more than one primary-key look-up.

The server is a throwaway cluster (``sqla_tenancy.testing.TestServer``), or the superuser DSN in
``$SQLA_TENANCY_TEST_DSN``. This is a benchmark, not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from interleaved import Results
from sqlalchemy import Engine, Text, create_engine, event, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_tenancy import Tenancy, TenantScoped, tenant_context
from sqla_tenancy.binding import admit_statement, admitted_binding, binding_statement
from sqla_tenancy.dialect import DRIVER_NAME
from sqla_tenancy.testing import TestServer

TENANT = "acme"
OTHER = "globex"
DB_TENANT = "dbacme"
DB_VARIANTS = ("database", "db_limit")
SETTING = "app.current_tenant_id"
VARIANTS = ("tenancy", "switching", "limit", "naive")
SYNC_VARIANTS = (*VARIANTS, "pins", "admitted")


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


# -- set-up ---------------------------------------------------------------------------------


@dataclass
class Fixture:
    server: TestServer
    database: str
    tenancy: Tenancy
    tenant_id: uuid.UUID
    pks: list[int]
    other_pk: int
    other_pks: list[int]

    @property
    def app_url(self) -> URL:
        return self.server.url(self.database)


def populate(tenancy: Tenancy, rows: int) -> tuple[list[int], list[int]]:
    """``rows`` projects per tenant; returns the first tenant's ids and the other's."""
    maker = tenancy.sessionmaker()
    ids: dict[str, list[int]] = {}
    for slug in (TENANT, OTHER):
        with tenant_context(slug), maker() as s:
            projects = [Project(name=f"{slug}-{i}") for i in range(rows)]
            s.add_all(projects)
            s.commit()
            ids[slug] = [p.id for p in projects]
    return ids[TENANT], ids[OTHER]


def tenant_options(tenant_id: uuid.UUID) -> dict[str, Any]:
    return {"options": f"-c {SETTING}={tenant_id}"}


def add_naive_binding(engine: Engine, tenant_id: uuid.UUID) -> None:
    """Bind at SQLAlchemy's ``begin`` with one more statement, after psycopg's own BEGIN."""
    value = str(tenant_id)

    @event.listens_for(engine, "begin")
    def bind(conn: Any) -> None:
        cursor = conn.connection.cursor()
        try:
            cursor.execute(f"select set_config('{SETTING}', %s, true)", (value,))
        finally:
            cursor.close()


# -- timing ---------------------------------------------------------------------------------


def keys_of(pks: list[int], start: int, statements: int) -> Keys:
    """The primary keys one transaction reads: ``statements`` consecutive rows from ``start``."""
    return tuple(pks[(start * statements + j) % len(pks)] for j in range(statements))


# -- sync -----------------------------------------------------------------------------------

Keys = tuple[int, ...]
SyncTx = Callable[[Keys], None]


def sync_variants(fx: Fixture) -> tuple[dict[str, SyncTx], list[Engine]]:
    tenancy_maker = fx.tenancy.sessionmaker()

    def tenancy_tx(keys: Keys) -> None:
        with tenant_context(TENANT), tenancy_maker() as s:
            for pk in keys:
                s.get(Project, pk)
            s.commit()

    turn = [0]
    others = dict(zip(fx.pks, fx.other_pks, strict=True))

    def switching_tx(keys: Keys) -> None:
        turn[0] ^= 1
        slug, own = (OTHER, [others[pk] for pk in keys]) if turn[0] else (TENANT, keys)
        with tenant_context(slug), tenancy_maker() as s:
            for pk in own:
                s.get(Project, pk)
            s.commit()

    limit_engine = create_engine(fx.app_url, connect_args=tenant_options(fx.tenant_id))
    naive_engine = create_engine(fx.app_url)
    add_naive_binding(naive_engine, fx.tenant_id)

    def plain_tx(maker: sessionmaker[Session]) -> SyncTx:
        def tx(keys: Keys) -> None:
            with maker() as s:
                for pk in keys:
                    s.get(Project, pk)
                s.commit()

        return tx

    pins = binding_statement(fx.tenant_id)
    admitted = admitted_binding(admit_statement(fx.tenant_id, placement="shared", call=True), pins)
    dialect_url = fx.app_url.set(drivername=f"postgresql+{DRIVER_NAME}")
    pins_engine = create_engine(dialect_url, binder=lambda: pins)
    admitted_engine = create_engine(dialect_url, binder=lambda: admitted)

    variants = {
        "tenancy": tenancy_tx,
        "switching": switching_tx,
        "limit": plain_tx(sessionmaker(limit_engine)),
        "naive": plain_tx(sessionmaker(naive_engine)),
        "pins": plain_tx(sessionmaker(pins_engine)),
        "admitted": plain_tx(sessionmaker(admitted_engine)),
    }
    return variants, [limit_engine, naive_engine, pins_engine, admitted_engine]


def check_sync(fx: Fixture) -> None:
    """Every variant sees the tenant's rows and not the other tenant's (RLS is really on)."""
    tenancy_maker = fx.tenancy.sessionmaker()
    limit_engine = create_engine(fx.app_url, connect_args=tenant_options(fx.tenant_id))
    naive_engine = create_engine(fx.app_url)
    add_naive_binding(naive_engine, fx.tenant_id)
    makers: dict[str, Callable[[], Session]] = {
        "tenancy": tenancy_maker,
        "limit": sessionmaker(limit_engine),
        "naive": sessionmaker(naive_engine),
    }
    try:
        for name, maker in makers.items():
            with tenant_context(TENANT), maker() as s:
                mine = s.get(Project, fx.pks[0])
                theirs = s.get(Project, fx.other_pk)
                count = len(s.scalars(select(Project.id)).all())
            _check(name, mine, theirs, count, len(fx.pks))
    finally:
        limit_engine.dispose()
        naive_engine.dispose()


def _check(name: str, mine: Project | None, theirs: Project | None, count: int, rows: int) -> None:
    if mine is None or theirs is not None or count != rows:
        raise SystemExit(
            f"{name}: RLS is not doing what the benchmark assumes "
            f"(own row {mine is not None}, other's row {theirs is not None}, {count}/{rows} rows)"
        )


def run_sync(fx: Fixture, rounds: int, per_round: int, warmup: int, statements: int) -> Results:
    variants, engines = sync_variants(fx)
    try:
        check_sync(fx)
        pks = fx.pks
        for tx in variants.values():
            for i in range(warmup):
                tx(keys_of(pks, i, statements))
        results = Results(SYNC_VARIANTS, "limit")
        perf = time.perf_counter_ns
        for round_no in range(rounds):
            base = round_no * per_round
            batch = [keys_of(pks, base + i, statements) for i in range(per_round)]
            for variant in results.order(round_no):
                tx = variants[variant]
                gc.collect()
                start = perf()
                for keys in batch:
                    tx(keys)
                elapsed = perf() - start
                results.per_round[variant].append(elapsed / per_round / 1000)
        return results
    finally:
        for engine in engines:
            engine.dispose()


# -- database placement ---------------------------------------------------------------------


def run_database(fx: Fixture, rounds: int, per_round: int, warmup: int, statements: int) -> Results:
    tenancy = fx.tenancy
    tenant = tenancy.get_tenant(DB_TENANT)
    maker = tenancy.sessionmaker()
    with tenant_context(DB_TENANT), maker() as s:
        projects = [Project(name=f"db-{i}") for i in range(len(fx.pks))]
        s.add_all(projects)
        s.commit()
        pks = [p.id for p in projects]
    url = tenancy.placement("database").app_url(tenant).set(drivername="postgresql+psycopg")  # type: ignore[attr-defined]
    limit_engine = create_engine(url, connect_args=tenant_options(tenant.id))

    def database_tx(keys: Keys) -> None:
        with tenant_context(DB_TENANT), maker() as s:
            for pk in keys:
                s.get(Project, pk)
            s.commit()

    limit_maker = sessionmaker(limit_engine)

    def limit_tx(keys: Keys) -> None:
        with limit_maker() as s:
            for pk in keys:
                s.get(Project, pk)
            s.commit()

    variants: dict[str, SyncTx] = {"database": database_tx, "db_limit": limit_tx}
    try:
        with limit_maker() as plain:
            if plain.get(Project, pks[0]) is None:
                raise SystemExit("db_limit: the tenant's own row is not visible")
        for tx in variants.values():
            for i in range(warmup):
                tx(keys_of(pks, i, statements))
        results = Results(DB_VARIANTS, "db_limit")
        perf = time.perf_counter_ns
        for round_no in range(rounds):
            base = round_no * per_round
            batch = [keys_of(pks, base + i, statements) for i in range(per_round)]
            for variant in results.order(round_no):
                tx = variants[variant]
                gc.collect()
                start = perf()
                for keys in batch:
                    tx(keys)
                elapsed = perf() - start
                results.per_round[variant].append(elapsed / per_round / 1000)
        return results
    finally:
        limit_engine.dispose()


# -- async ----------------------------------------------------------------------------------

AsyncTx = Callable[[Keys], Awaitable[None]]


async def run_async(fx: Fixture, rounds: int, per_round: int, warmup: int, statements: int) -> Results:
    tenancy_maker = fx.tenancy.async_sessionmaker()
    limit_engine = create_async_engine(fx.app_url, connect_args=tenant_options(fx.tenant_id))
    naive_engine = create_async_engine(fx.app_url)
    add_naive_binding(naive_engine.sync_engine, fx.tenant_id)
    engines: list[AsyncEngine] = [limit_engine, naive_engine]

    async def tenancy_tx(keys: Keys) -> None:
        with tenant_context(TENANT):
            async with tenancy_maker() as s:
                for pk in keys:
                    await s.get(Project, pk)
                await s.commit()

    turn = [0]
    others = dict(zip(fx.pks, fx.other_pks, strict=True))

    async def switching_tx(keys: Keys) -> None:
        turn[0] ^= 1
        slug, own = (OTHER, [others[pk] for pk in keys]) if turn[0] else (TENANT, keys)
        with tenant_context(slug):
            async with tenancy_maker() as s:
                for pk in own:
                    await s.get(Project, pk)
                await s.commit()

    def plain_tx(maker: async_sessionmaker[AsyncSession]) -> AsyncTx:
        async def tx(keys: Keys) -> None:
            async with maker() as s:
                for pk in keys:
                    await s.get(Project, pk)
                await s.commit()

        return tx

    variants: dict[str, AsyncTx] = {
        "tenancy": tenancy_tx,
        "switching": switching_tx,
        "limit": plain_tx(async_sessionmaker(limit_engine)),
        "naive": plain_tx(async_sessionmaker(naive_engine)),
    }
    try:
        await check_async(fx, tenancy_maker, limit_engine, naive_engine)
        pks = fx.pks
        for tx in variants.values():
            for i in range(warmup):
                await tx(keys_of(pks, i, statements))
        results = Results(VARIANTS, "limit")
        perf = time.perf_counter_ns
        for round_no in range(rounds):
            base = round_no * per_round
            batch = [keys_of(pks, base + i, statements) for i in range(per_round)]
            for variant in results.order(round_no):
                tx = variants[variant]
                gc.collect()
                start = perf()
                for keys in batch:
                    await tx(keys)
                elapsed = perf() - start
                results.per_round[variant].append(elapsed / per_round / 1000)
        return results
    finally:
        for engine in engines:
            await engine.dispose()
        # The Tenancy's async engines belong to this event loop: close them inside it.
        await fx.tenancy.dispose_async()


async def check_async(
    fx: Fixture,
    tenancy_maker: async_sessionmaker[AsyncSession],
    limit_engine: AsyncEngine,
    naive_engine: AsyncEngine,
) -> None:
    makers: dict[str, async_sessionmaker[AsyncSession]] = {
        "tenancy": tenancy_maker,
        "limit": async_sessionmaker(limit_engine),
        "naive": async_sessionmaker(naive_engine),
    }
    for name, maker in makers.items():
        with tenant_context(TENANT):
            async with maker() as s:
                mine = await s.get(Project, fx.pks[0])
                theirs = await s.get(Project, fx.other_pk)
                count = len((await s.scalars(select(Project.id))).all())
        _check(f"async {name}", mine, theirs, count, len(fx.pks))


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30)")
    parser.add_argument(
        "--per-round", type=int, default=None, help="transactions per variant a round (default 200)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up transactions per variant")
    parser.add_argument("--rows", type=int, default=1000, help="rows per tenant (default 1000)")
    parser.add_argument(
        "--statements",
        type=int,
        default=1,
        help="primary-key SELECTs per transaction, each of another row (default 1)",
    )
    parser.add_argument("--quick", action="store_true", help="a few short rounds: a smoke run for CI")
    parser.add_argument("--no-sync", action="store_true", help="skip the sync benchmark")
    parser.add_argument("--no-async", action="store_true", help="skip the async benchmark")
    parser.add_argument("--no-database", action="store_true", help="skip the database placement's benchmark")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 30
    if args.per_round is None:
        args.per_round = 50 if args.quick else 200
    if args.warmup is None:
        args.warmup = 50 if args.quick else 300
    if args.rounds < 1 or args.per_round < 1 or args.warmup < 0 or args.rows < 1 or args.statements < 1:
        parser.error("--rounds, --per-round, --rows and --statements must be positive, --warmup non-negative")
    if args.statements > args.rows:
        parser.error("--statements must not exceed --rows (each SELECT reads another row)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    server = TestServer.start()
    tenancy: Tenancy | None = None
    try:
        database = server.create_database()
        # (its tenants' roles are dropped with the database)
        tenancy = server.tenancy(database, Base.metadata, secret_key="bench-binding secret key, 32 bytes")
        tenancy.install()
        acme = tenancy.create_tenant(TENANT)
        tenancy.create_tenant(OTHER)
        if not args.no_database:
            tenancy.prepare_server(server.superuser_url)
            tenancy.create_tenant(DB_TENANT, placement="database")
        pks, other_pks = populate(tenancy, args.rows)
        server.execute("ANALYZE projects", database=database)
        fx = Fixture(server, database, tenancy, acme.id, pks, other_pks[0], other_pks)
        print(
            f"sqla-tenancy binding benchmark: python {sys.version.split()[0]}, "
            f"{args.rows} rows per tenant, {args.statements} primary-key SELECT"
            f"{'s' if args.statements > 1 else ''} per transaction, "
            f"role {server.app_role} (NOSUPERUSER NOBYPASSRLS), "
            f"{'$SQLA_TENANCY_TEST_DSN' if server.cluster is None else 'temporary cluster'}"
        )
        summary: list[str] = []
        if not args.no_sync:
            sync = run_sync(fx, args.rounds, args.per_round, args.warmup, args.statements)
            sync.print_table("sync", args.rounds, args.per_round)
            summary.append(
                f"sync tenancy/limit = {sync.ratio('tenancy'):.3f} "
                f"switching/limit = {sync.ratio('switching'):.3f}"
            )
            parts = {
                v: statistics.median(
                    a - b for a, b in zip(sync.per_round[v], sync.per_round[base], strict=True)
                )
                for v, base in (("pins", "limit"), ("admitted", "pins"), ("tenancy", "admitted"))
            }
            print(
                f"\nsync, where tenancy's extra time goes (paired medians of the per-round differences, "
                f"µs per transaction): pins {parts['pins']:.1f}, admission {parts['admitted']:.1f}, "
                f"Python side (context, router, session, pre-ping) {parts['tenancy']:.1f}"
            )
        if not args.no_database:
            db = run_database(fx, args.rounds, args.per_round, args.warmup, args.statements)
            db.print_table("sync, database placement", args.rounds, args.per_round)
            summary.append(
                f"database/db_limit = {db.ratio('database'):.3f} (paired {db.paired('database'):.3f})"
            )
        if not args.no_async:
            async_ = asyncio.run(run_async(fx, args.rounds, args.per_round, args.warmup, args.statements))
            async_.print_table("async", args.rounds, args.per_round)
            summary.append(
                f"async tenancy/limit = {async_.ratio('tenancy'):.3f} "
                f"switching/limit = {async_.ratio('switching'):.3f}"
            )
        print()
        print("  ".join(summary))
        print(f"(total {time.monotonic() - started:.1f} s)")
        return 0
    finally:
        try:
            if tenancy is not None:
                tenancy.dispose()
        finally:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
