"""What schema placement costs: provisioning a fleet, one transaction, and a growing catalog.

Every tenant here is a *schema* tenant (``create_tenant(slug, placement="schema")``): a schema of its
own holding the three tenant tables (``projects``, ``tasks`` -> ``projects``, ``comments`` ->
``tasks``, each tenant-scoped with row-level security and a couple of indexes), and a NOLOGIN role
that may use that schema and the infrastructure schema ``auth`` (a tenant-scoped ``users`` table).
Three parts, selectable with ``--parts``:

``provision``
    N tenants (``--tenants``, default 2000) created one after another, each ``create_tenant`` timed
    with ``perf_counter``. The table shows the median and p90 per bucket of tenants (1-10, 11-100,
    101-500, 501-1000, then every 1000, the last 100 on their own), then the overall median and
    p90, the median over the first 500, the total, median(last 100) / median(first 100) and
    median(last bucket) / median(11-100) (1.0: provisioning does not slow down as the fleet grows),
    and the least-squares trend over the second half of the fleet, in ms per 1000 tenants (0:
    flat), which a slow start on a fresh cluster cannot mask. Then the split across the
    provisioning steps, from ``Tenancy._fault_injector`` (called with each step's name before the
    step runs): the median time from one step's call to the next, for the first and the last 100
    tenants (``(before)`` is what precedes the first step; ``activate`` runs to the end, commit
    included).

    With ``--reference``, every creation in the fleet is followed by one on a second throwaway
    cluster that holds :data:`SMALL_FLEET` schema tenants throughout (each tenant created there is
    timed, then deleted, untimed). The two creations of a pair meet the same moment of the
    machine's load, so the per-pair ratio fleet / reference shows what the fleet's size costs
    with the machine's drift taken out: per bucket, the paired flatness (the last bucket's
    median ratio over that of tenants 11-100), its trend over the second half, and each step's
    per-pair difference for the first and the last 100.
``select``
    The one-SELECT transaction (open a session, one primary-key SELECT, commit, close) for one
    schema tenant, timed as ``benchmarks/bench_binding.py`` does (warm-up, interleaved rounds whose
    order rotates, median of per-round means, ratio to ``limit``, median of per-round ratios):

    ``tenancy``
        a :class:`TenantSession` inside ``tenant_context(<tenant>)``: ``BEGIN; SET LOCAL
        search_path ...; SET LOCAL ROLE ...; SET LOCAL app.current_tenant_id ...`` in one query.
    ``limit``
        a plain ``Session`` on a plain ``postgresql+psycopg`` engine of the same application role
        whose connections are bound once, at connect time, by startup options
        (``-c role=<tenant role> -c search_path=<tenant schema> -c app.current_tenant_id=<uuid>``):
        the same role, schema and RLS work with no per-transaction binding cost.

    Sync, and async unless ``--no-async``. With ``provision`` it runs once the whole fleet exists.
``catalog``
    The same two variants, sync, measured once when 10 tenant schemas exist and again when N exist:
    does a query on one tenant get slower as the catalog grows? With ``provision`` the fleet is
    shared: the "10" figure is taken after the 10th tenant, before the rest are provisioned. The
    two figures are a while apart, so besides each variant's N/10 ratio the table gives the change
    of the paired tenancy/limit ratio, which a drift of machine load does not move.

Run::

    python benchmarks/bench_schema.py                       # everything, 2000 tenants
    python benchmarks/bench_schema.py --quick               # smoke run for CI (< 20 s)
    python benchmarks/bench_schema.py --parts select --rounds 50 --per-round 400
    python benchmarks/bench_schema.py --parts provision,catalog --tenants 5000
    python benchmarks/bench_schema.py --parts provision --tenants 5000 --reference

The server is a throwaway PostgreSQL cluster (``sqla_tenancy.testing.TestServer``), or the superuser
DSN in ``$SQLA_TENANCY_TEST_DSN``. This is a benchmark, not a test: it asserts nothing about timings.

Creating a tenant creates about 17 files (tables, indexes, TOAST), so on a disk the provisioning
figures follow the file system's moments too: on the development machine's virtual disk (ext4) the
``tables`` step alternated between about 4.5 and 17 ms in windows of hundreds of tenants, whatever
the fleet's size (a loop of the same ``CREATE TABLE`` script without any role showed the same),
which buries any growth. Read flatness on a cluster whose files live in memory, where that step
holds at 3.6-4.2 ms from the first tenant to the 5,000th::

    TMPDIR=/dev/shm python benchmarks/bench_schema.py --parts provision --tenants 5000

(the temporary cluster lives under ``$TMPDIR``; the first line printed says on which file system).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any

from interleaved import Results
from sqlalchemy import (
    Boolean,
    DateTime,
    Engine,
    Index,
    Text,
    create_engine,
    exc,
    func,
    select,
    text,
)
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_tenancy import Tenancy, Tenant, TenantScoped, tenant_context, tenant_foreign_key
from sqla_tenancy.identifiers import quote_ident
from sqla_tenancy.testing import TestServer

PARTS = ("provision", "select", "catalog")
VARIANTS = ("tenancy", "limit")
SETTING = "app.current_tenant_id"
#: Rows in the measured tenant's ``projects`` table.
ROWS = 1000
#: Buckets of the provisioning table (1-based tenant numbers, inclusive); beyond, every 1000.
BUCKETS = ((1, 10), (11, 100), (101, 500), (501, 1000))
#: What ``create_tenant(..., placement="schema")`` reports to the fault injector, in order.
STEPS = ("register", "schema", "tables", "role", "membership", "activate")
#: The split: what precedes the first step, then each step from its call to the next one's
#: (``activate``: to the end of create_tenant, the commit included).
PHASES = ("(before)", *STEPS)
#: The catalog part's small fleet.
SMALL_FLEET = 10
#: The goal the provisioning figures are read against (ms per tenant).
PROVISION_GOAL_MS = 15.0
#: The flatness goal: median(last 100 tenants) / median(first 100) at most this.
FLATNESS_GOAL = 1.10


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    __tablename__ = "projects"
    __table_args__ = (Index("projects_name_idx", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Task(TenantScoped, Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("tasks_project_done_idx", "project_id", "done"),
        tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(index=True)
    title: Mapped[str] = mapped_column(Text)
    done: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class Comment(TenantScoped, Base):
    __tablename__ = "comments"
    __table_args__ = (
        Index("comments_task_created_idx", "task_id", "created_at"),
        tenant_foreign_key(["task_id"], ["tasks.id"], ondelete="CASCADE"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(index=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class User(TenantScoped, Base):
    """Infrastructure: kept once, in the main database's ``auth`` schema."""

    __tablename__ = "users"
    __table_args__ = (Index("users_email_idx", "tenant_id", "email", unique=True), {"schema": "auth"})

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)


INFRASTRUCTURE = ("auth",)


# -- set-up ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The schema tenants created so far, in order, with what each ``create_tenant`` took."""

    server: TestServer
    database: str
    tenancy: Tenancy
    tenants: list[Tenant] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    #: per tenant, the ms of each of PHASES
    phases_ms: list[dict[str, float]] = field(default_factory=list)
    pks: list[int] = field(default_factory=list)

    @property
    def app_url(self) -> URL:
        return self.server.url(self.database)

    @property
    def target(self) -> Tenant:
        """The tenant every query is made for (the first one)."""
        return self.tenants[0]

    @property
    def other(self) -> Tenant:
        return self.tenants[1]

    def grow(self, size: int, reference: Fleet | None = None) -> None:
        """Create tenants, one after another, until there are ``size``. With ``reference`` (a
        small fleet on a cluster of its own), each creation is followed by one there, timed the
        same way, and that tenant's deletion (untimed): the reference stays at its size, and the
        two creations of a pair run in the same moment of the machine's load."""
        perf = time.perf_counter
        marks: list[tuple[str, float]] = []
        self.tenancy._fault_injector = lambda step: marks.append((step, perf()))
        if reference is not None:
            reference.tenancy._fault_injector = lambda step: marks.append((step, perf()))
        try:
            for number in range(len(self.tenants) + 1, size + 1):
                self.tenants.append(self._create_timed(f"t{number:05d}", marks))
                if reference is not None:
                    reference.tenancy.delete_tenant(reference._create_timed(f"r{number:05d}", marks))
        finally:
            self.tenancy._fault_injector = None
            if reference is not None:
                reference.tenancy._fault_injector = None

    def _create_timed(self, slug: str, marks: list[tuple[str, float]]) -> Tenant:
        """``create_tenant(slug)``, its time and its steps' times recorded."""
        perf = time.perf_counter
        marks.clear()
        start = perf()
        tenant = self.tenancy.create_tenant(slug, placement="schema")
        end = perf()
        self.times_ms.append((end - start) * 1000)
        if tuple(m[0] for m in marks) != STEPS:
            raise SystemExit(f"unexpected provisioning steps {[m[0] for m in marks]}")
        bounds = [start, *(m[1] for m in marks), end]
        self.phases_ms.append(
            {name: (b - a) * 1000 for name, (a, b) in zip(PHASES, pairwise(bounds), strict=True)}
        )
        return tenant

    def populate(self) -> None:
        """``ROWS`` projects in the measured tenant, one in the other; statistics up to date."""
        maker = self.tenancy.sessionmaker()
        with tenant_context(self.target.slug), maker() as s:
            projects = [Project(name=f"project-{i}") for i in range(ROWS)]
            s.add_all(projects)
            s.commit()
            self.pks = [p.id for p in projects]
        with tenant_context(self.other.slug), maker() as s:
            s.add(Project(name="other"))
            s.commit()
        schema = quote_ident(self.target.location["schema"])
        self.server.execute(f"ANALYZE {schema}.projects", database=self.database)


def limit_connect_args(tenant: Tenant) -> dict[str, Any]:
    """Startup options binding a connection to the tenant for its whole life (role included:
    PostgreSQL accepts ``role`` as a startup setting when the login role may SET ROLE to it)."""
    role, schema = tenant.location["role"], tenant.location["schema"]
    return {"options": f"-c role={role} -c search_path={schema} -c {SETTING}={tenant.id}"}


def server_version(server: TestServer) -> str:
    with server.superuser.connect() as conn:
        return str(conn.exec_driver_sql("select current_setting('server_version')").scalar_one())


def storage(server: TestServer) -> str:
    """Where the temporary cluster's files are: the file system type of its data directory
    (from ``/proc/mounts``: the longest mount point that contains it)."""
    if server.cluster is None:
        return "$SQLA_TENANCY_TEST_DSN"
    data = os.path.realpath(server.cluster.datadir)
    best, kind = "", "unknown file system"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, point, fstype, *_ = line.split()
                inside = data == point or data.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fstype
    except OSError:
        pass
    return f"temporary cluster on {kind} ({data})"


# -- checks ---------------------------------------------------------------------------------


@dataclass
class Seen:
    """What one variant's transaction saw, for :func:`check_seen`."""

    user: str
    schema: str
    own_row: bool
    rows: int
    other_schema_refused: bool


def check_seen(name: str, fleet: Fleet, seen: Seen) -> None:
    """Both variants run as the tenant's role, in its schema, under RLS, and cannot read another
    tenant's schema: otherwise the comparison would be meaningless."""
    expected = (fleet.target.location["role"], fleet.target.location["schema"], True, ROWS, True)
    got = (seen.user, seen.schema, seen.own_row, seen.rows, seen.other_schema_refused)
    if got != expected:
        raise SystemExit(
            f"{name}: the binding is not what the benchmark assumes: "
            f"(role, schema, own row, rows, other schema refused) = {got}, expected {expected}"
        )


def _other_projects(fleet: Fleet) -> Any:
    return text(f"select 1 from {quote_ident(fleet.other.location['schema'])}.projects limit 1")


def see_sync(fleet: Fleet, maker: Callable[[], Session]) -> Seen:
    with tenant_context(fleet.target.slug), maker() as s:
        user, schema = s.execute(text("select current_user, current_schema()")).one()
        own = s.get(Project, fleet.pks[0]) is not None
        rows = s.scalar(select(func.count()).select_from(Project)) or 0
        try:
            s.execute(_other_projects(fleet))
            refused = False
        except exc.ProgrammingError:
            refused = True
    return Seen(user, schema, own, rows, refused)


async def see_async(fleet: Fleet, maker: async_sessionmaker[AsyncSession]) -> Seen:
    with tenant_context(fleet.target.slug):
        async with maker() as s:
            user, schema = (await s.execute(text("select current_user, current_schema()"))).one()
            own = await s.get(Project, fleet.pks[0]) is not None
            rows = await s.scalar(select(func.count()).select_from(Project)) or 0
            try:
                await s.execute(_other_projects(fleet))
                refused = False
            except exc.ProgrammingError:
                refused = True
    return Seen(user, schema, own, rows, refused)


# -- timing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    rounds: int
    per_round: int
    warmup: int


SyncTx = Callable[[int], None]
AsyncTx = Callable[[int], Awaitable[None]]


def sync_tx(maker: Callable[[], Session], slug: str) -> SyncTx:
    def tx(pk: int) -> None:
        with tenant_context(slug), maker() as s:
            s.get(Project, pk)
            s.commit()

    return tx


def plain_sync_tx(maker: Callable[[], Session]) -> SyncTx:
    def tx(pk: int) -> None:
        with maker() as s:
            s.get(Project, pk)
            s.commit()

    return tx


def run_sync(fleet: Fleet, timing: Timing) -> Results:
    """Both variants, checked, warmed up, then timed in interleaved rounds."""
    tenancy_maker = fleet.tenancy.sessionmaker()
    limit_engine: Engine = create_engine(fleet.app_url, connect_args=limit_connect_args(fleet.target))
    try:
        limit_maker = sessionmaker(limit_engine)
        check_seen("tenancy", fleet, see_sync(fleet, tenancy_maker))
        check_seen("limit", fleet, see_sync(fleet, limit_maker))
        variants: dict[str, SyncTx] = {
            "tenancy": sync_tx(tenancy_maker, fleet.target.slug),
            "limit": plain_sync_tx(limit_maker),
        }
        pks = fleet.pks
        for tx in variants.values():
            for i in range(timing.warmup):
                tx(pks[i % len(pks)])
        results = Results(VARIANTS, "limit")
        perf = time.perf_counter_ns
        for round_no in range(timing.rounds):
            base = round_no * timing.per_round
            batch = [pks[(base + i) % len(pks)] for i in range(timing.per_round)]
            for variant in results.order(round_no):
                tx = variants[variant]
                gc.collect()
                start = perf()
                for pk in batch:
                    tx(pk)
                elapsed = perf() - start
                results.per_round[variant].append(elapsed / timing.per_round / 1000)
        return results
    finally:
        limit_engine.dispose()


async def run_async(fleet: Fleet, timing: Timing) -> Results:
    """As :func:`run_sync`, with ``AsyncSession``. Disposes the Tenancy's async engines, which
    belong to this event loop."""
    tenancy_maker = fleet.tenancy.async_sessionmaker()
    limit_engine: AsyncEngine = create_async_engine(
        fleet.app_url, connect_args=limit_connect_args(fleet.target)
    )
    limit_maker = async_sessionmaker(limit_engine)
    slug = fleet.target.slug

    async def tenancy_tx(pk: int) -> None:
        with tenant_context(slug):
            async with tenancy_maker() as s:
                await s.get(Project, pk)
                await s.commit()

    async def limit_tx(pk: int) -> None:
        async with limit_maker() as s:
            await s.get(Project, pk)
            await s.commit()

    variants: dict[str, AsyncTx] = {"tenancy": tenancy_tx, "limit": limit_tx}
    try:
        check_seen("async tenancy", fleet, await see_async(fleet, tenancy_maker))
        check_seen("async limit", fleet, await see_async(fleet, limit_maker))
        pks = fleet.pks
        for tx in variants.values():
            for i in range(timing.warmup):
                await tx(pks[i % len(pks)])
        results = Results(VARIANTS, "limit")
        perf = time.perf_counter_ns
        for round_no in range(timing.rounds):
            base = round_no * timing.per_round
            batch = [pks[(base + i) % len(pks)] for i in range(timing.per_round)]
            for variant in results.order(round_no):
                tx = variants[variant]
                gc.collect()
                start = perf()
                for pk in batch:
                    await tx(pk)
                elapsed = perf() - start
                results.per_round[variant].append(elapsed / timing.per_round / 1000)
        return results
    finally:
        await limit_engine.dispose()
        await fleet.tenancy.dispose_async()


# -- reports --------------------------------------------------------------------------------


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def buckets_reached(count: int) -> list[tuple[int, int]]:
    """The buckets holding tenants 1..count (the last one cut at count; beyond 1000, one per 1000,
    the last 100 tenants in one of their own)."""
    reached = [(lo, min(hi, count)) for lo, hi in BUCKETS if lo <= count]
    lo = BUCKETS[-1][1] + 1
    while lo <= count:
        hi = min(lo + 999, count)
        if count > 1000 and hi == count and hi - lo + 1 > 100:
            reached += [(lo, count - 100), (count - 99, count)]
        else:
            reached.append((lo, hi))
        lo = hi + 1
    return reached


def print_phases(fleet: Fleet) -> None:
    """Where a create_tenant's time goes, for the first and the last 100 tenants."""
    count = len(fleet.phases_ms)
    if count < 2:
        return
    span = min(100, count // 2)
    first, last = fleet.phases_ms[:span], fleet.phases_ms[-span:]
    print(f"  per step (from its _fault_injector call to the next; medians, ms): first {span}, last {span}")
    for name in PHASES:
        a = statistics.median(p[name] for p in first)
        b = statistics.median(p[name] for p in last)
        print(f"    {name:<11} {a:8.2f} {b:8.2f}")


def print_provisioning(times_ms: Sequence[float]) -> list[str]:
    count = len(times_ms)
    print(f"\nprovision: {count} schema tenants created one after another, ms per create_tenant")
    print(f"  {'tenants':<11} {'count':>6} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    medians: dict[tuple[int, int], float] = {}
    for lo, hi in buckets_reached(count):
        values = times_ms[lo - 1 : hi]
        medians[lo, hi] = statistics.median(values)
        print(
            f"  {f'{lo}-{hi}':<11} {len(values):>6} {medians[lo, hi]:8.2f} {p90(values):8.2f} "
            f"{min(values):8.2f} {max(values):8.2f}"
        )
    overall = statistics.median(times_ms)
    print(
        f"  {'all':<11} {count:>6} {overall:8.2f} {p90(times_ms):8.2f} "
        f"{min(times_ms):8.2f} {max(times_ms):8.2f}"
    )
    first = times_ms[:500]
    print(f"  creating {len(first)} tenants: median {statistics.median(first):.2f} ms per tenant")
    print(f"  total: {sum(times_ms) / 1000:.1f} s for {count} tenants")
    last = max(medians)
    summary = [
        f"provision median {overall:.1f} ms, {last[0]}-{last[1]} {medians[last]:.1f} ms "
        f"(goal <= {PROVISION_GOAL_MS:.0f})"
    ]
    if count >= 200:
        head, tail = statistics.median(times_ms[:100]), statistics.median(times_ms[-100:])
        ratio = tail / head
        print(
            f"  median first 100 {head:.2f} ms, last 100 ({count - 99}-{count}) {tail:.2f} ms: "
            f"ratio {ratio:.3f} (goal <= {FLATNESS_GOAL:.2f})"
        )
        summary.append(f"last100/first100 {ratio:.3f}")
    if (11, 100) in medians and last[0] > 11:
        flat = medians[last] / medians[11, 100]
        print(f"  flatness: median({last[0]}-{last[1]}) / median(11-100) = {flat:.3f}")
        summary.append(f"flatness {flat:.3f}")
    # The bucket ratio can hide growth behind a slow start (a fresh cluster's first relations
    # are the dearest on some file systems): the trend over the second half shows it.
    trend = second_half_trend(times_ms)
    if trend is not None:
        lo, slope = trend
        print(f"  trend over tenants {lo}-{count}: {slope * 1000:+.1f} ms per 1000 tenants (least squares)")
        summary.append(f"trend {slope * 1000:+.1f} ms/1000 tenants")
    return summary


def second_half_trend(values: Sequence[float]) -> tuple[int, float] | None:
    """The first tenant of the second half (past the small fleet) and the least-squares slope of
    ``values`` per tenant from there on; None for too few tenants."""
    count = len(values)
    lo = max(SMALL_FLEET + 1, count // 2 + 1)
    if count - lo < 10:
        return None
    return lo, statistics.linear_regression(range(lo, count + 1), values[lo - 1 :]).slope


def print_paired(fleet: Fleet, reference: Fleet) -> list[str]:
    """The fleet's creations against the reference's, pair by pair: what the fleet's size
    costs once the machine's drift, which moves both, is taken out."""
    mine, theirs = fleet.times_ms, reference.times_ms
    count = len(mine)
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    print(
        f"\nprovision, paired: each creation in the fleet followed by one on a reference cluster "
        f"holding {SMALL_FLEET} schema tenants (each created, timed, then deleted)"
    )
    print(f"  {'tenants':<11} {'fleet ms':>9} {'ref ms':>8} {'fleet/ref':>10}")
    medians: dict[tuple[int, int], float] = {}
    for lo, hi in buckets_reached(count):
        medians[lo, hi] = statistics.median(ratios[lo - 1 : hi])
        print(
            f"  {f'{lo}-{hi}':<11} {statistics.median(mine[lo - 1 : hi]):9.2f} "
            f"{statistics.median(theirs[lo - 1 : hi]):8.2f} {medians[lo, hi]:10.3f}"
        )
    summary = []
    last = max(medians)
    if (11, 100) in medians and last[0] > 11:
        flat = medians[last] / medians[11, 100]
        print(
            f"  paired flatness: fleet/ref of {last[0]}-{last[1]} over fleet/ref of 11-100 = {flat:.3f} "
            f"(goal <= {FLATNESS_GOAL:.2f})"
        )
        summary.append(f"paired flatness {flat:.3f}")
    trend = second_half_trend(ratios)
    if trend is not None:
        lo, slope = trend
        print(f"  trend of fleet/ref over tenants {lo}-{count}: {slope * 1000:+.3f} per 1000 tenants")
        summary.append(f"paired trend {slope * 1000:+.3f}/1000 tenants")
    if count >= 200:
        print("  per step, fleet minus reference (medians of the per-pair differences, ms): first, last 100")
        for name in PHASES:
            diffs = [a[name] - b[name] for a, b in zip(fleet.phases_ms, reference.phases_ms, strict=True)]
            head, tail = statistics.median(diffs[:100]), statistics.median(diffs[-100:])
            print(f"    {name:<11} {head:+8.2f} {tail:+8.2f}")
    return summary


def print_select(title: str, results: Results, timing: Timing) -> None:
    results.print_table(title, timing.rounds, timing.per_round)


def print_catalog(small: Results, large: Results, size: int, timing: Timing) -> list[str]:
    print(f"\ncatalog: the one-SELECT transaction with {SMALL_FLEET} and with {size} tenant schemas")
    print(f"  sync, {timing.rounds} rounds x {timing.per_round} transactions, median of per-round means")
    print(f"  {'schemas':>8} {'tenancy µs':>11} {'limit µs':>9} {'tenancy/limit':>14} {'paired':>7}")
    for schemas, results in ((SMALL_FLEET, small), (size, large)):
        print(
            f"  {schemas:>8} {results.median('tenancy'):11.1f} {results.median('limit'):9.1f} "
            f"{results.ratio('tenancy'):14.3f} {results.paired('tenancy'):7.3f}"
        )
    growth = {v: large.median(v) / small.median(v) for v in VARIANTS}
    # The two figures are taken a while apart, so a change of machine load moves both variants:
    # the paired ratio's change is the part due to the tenancy binding alone.
    relative = large.paired("tenancy") / small.paired("tenancy")
    print(
        f"  {size} / {SMALL_FLEET} schemas: tenancy {growth['tenancy']:.3f}, limit {growth['limit']:.3f}, "
        f"tenancy relative to limit (paired) {relative:.3f}"
    )
    return [
        f"catalog tenancy {size}/{SMALL_FLEET} = {growth['tenancy']:.3f} ({relative:.3f} relative to limit)"
    ]


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tenants", type=int, default=None, help="fleet size N (default 2000)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30)")
    parser.add_argument(
        "--per-round", type=int, default=None, help="transactions per variant a round (default 200)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up transactions per variant")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default {','.join(PARTS)})",
    )
    parser.add_argument("--quick", action="store_true", help="a small fleet, short rounds: CI smoke run")
    parser.add_argument("--no-async", action="store_true", help="skip the async select benchmark")
    parser.add_argument(
        "--reference",
        action="store_true",
        help=f"with provision: pair every creation with one on a second cluster of {SMALL_FLEET} tenants",
    )
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--parts: choose among {', '.join(PARTS)} (got {args.parts!r})")
    args.parts = [p for p in PARTS if p in parts]
    if args.reference and "provision" not in args.parts:
        parser.error("--reference pairs the provision part's creations: add provision to --parts")
    if args.tenants is None:
        args.tenants = 150 if args.quick else 2000
    if args.rounds is None:
        args.rounds = 3 if args.quick else 30
    if args.per_round is None:
        args.per_round = 50 if args.quick else 200
    if args.warmup is None:
        args.warmup = 50 if args.quick else 300
    if args.rounds < 1 or args.per_round < 1 or args.warmup < 0:
        parser.error("--rounds and --per-round must be positive, --warmup non-negative")
    minimum = SMALL_FLEET + 1 if "catalog" in args.parts else 2
    if args.tenants < minimum:
        parser.error(f"--tenants must be at least {minimum} for these parts")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parts: list[str] = args.parts
    timing = Timing(args.rounds, args.per_round, args.warmup)
    started = time.monotonic()
    server = TestServer.start()
    tenancy: Tenancy | None = None
    reference: Fleet | None = None
    try:
        database = server.create_database()
        tenancy = server.tenancy(database, Base.metadata, infrastructure_schemas=INFRASTRUCTURE)
        tenancy.install()
        fleet = Fleet(server, database, tenancy)
        if args.reference:
            reference = start_reference()
        size = args.tenants if {"provision", "catalog"} & set(parts) else 2
        print(
            f"sqla-tenancy schema placement benchmark: PostgreSQL {server_version(server)}, "
            f"python {sys.version.split()[0]}, "
            f"{storage(server)}"
        )
        print(
            f"parts {','.join(parts)}; fleet {size} schema tenants (3 tenant tables with RLS, "
            f"infrastructure schema auth); role {server.app_role} (NOSUPERUSER NOBYPASSRLS)"
        )
        summary: list[str] = []
        small: Results | None = None
        if "catalog" in parts:
            fleet.grow(SMALL_FLEET, reference)
            fleet.populate()
            small = run_sync(fleet, timing)
        fleet.grow(size, reference)
        if not fleet.pks and {"select", "catalog"} & set(parts):
            fleet.populate()
        if "provision" in parts:
            summary += print_provisioning(fleet.times_ms)
            print_phases(fleet)
            if reference is not None:
                summary += print_paired(fleet, reference)
        large = run_sync(fleet, timing) if small is not None else None
        if "select" in parts:
            print(
                f"\n(select: tenant {fleet.target.slug}, {ROWS} rows, {len(fleet.tenants)} tenant "
                "schemas; limit = plain engine, options -c role/search_path/app.current_tenant_id)"
            )
            sync = large if large is not None else run_sync(fleet, timing)
            # With the catalog part, its N-schema measurement is this one: no need to repeat it.
            shared = " (also the catalog part's large-fleet figure)" if large is not None else ""
            print_select(f"select sync{shared}", sync, timing)
            summary.append(f"sync tenancy/limit = {sync.ratio('tenancy'):.3f}")
            if not args.no_async:
                async_ = asyncio.run(run_async(fleet, timing))
                print_select("select async", async_, timing)
                summary.append(f"async tenancy/limit = {async_.ratio('tenancy'):.3f}")
        if small is not None and large is not None:
            summary += print_catalog(small, large, len(fleet.tenants), timing)
        print()
        print("  ".join(summary))
        print(f"(total {time.monotonic() - started:.1f} s)")
        return 0
    finally:
        try:
            if tenancy is not None:
                tenancy.dispose()
            if reference is not None:
                reference.tenancy.dispose()
        finally:
            try:
                server.stop()
            finally:
                if reference is not None:
                    reference.server.stop()


def start_reference() -> Fleet:
    """The reference fleet: :data:`SMALL_FLEET` schema tenants on a throwaway cluster of its own
    (never ``$SQLA_TENANCY_TEST_DSN``'s server: its catalog must not grow with the fleet's)."""
    server = TestServer.start(use_test_dsn=False)
    try:
        database = server.create_database()
        tenancy = server.tenancy(database, Base.metadata, infrastructure_schemas=INFRASTRUCTURE)
        tenancy.install()
        reference = Fleet(server, database, tenancy)
        reference.grow(SMALL_FLEET)
    except BaseException:
        server.stop()
        raise
    reference.times_ms.clear()
    reference.phases_ms.clear()
    return reference


if __name__ == "__main__":
    raise SystemExit(main())
