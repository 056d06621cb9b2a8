"""What fleet migrations cost: the no-op check, one revision across a fleet, and the template.

Every part builds a project the way a user does (``sqla-tenancy init``, ``alembic upgrade head``,
``alembic revision --autogenerate``) in a temporary directory, over this model: tenant tables
``projects`` and ``tasks`` (tenant-scoped, RLS) and an infrastructure table ``auth.users``.

``noop``
    N schema tenants (``--tenants``, default 1000), all at head. ``migrate_fleet`` with nothing to
    apply (one registry query; the template databases are the only locations it connects to) is
    timed against a plain ``alembic upgrade head``, which visits every location and reads its
    version table. Median of ``--repeat`` runs each, interleaved.
``revision``
    ``--revision-tenants`` schema tenants (default 500) on a fresh database; one revision (a
    nullable column and an index on ``projects``) applied by ``migrate_fleet(jobs=2)``, then
    another by ``jobs=1``: total wall time (worker start-up included) per tenant, and the median
    per-location duration from the report.
``database``
    ``--database-tenants`` database tenants (default 200, created with ``STRATEGY = FILE_COPY``),
    one revision with ``jobs=2``: total and per-tenant median.
``template``
    Provisioning a database tenant from a template kept at head (what ``create_tenant`` does)
    against provisioning from an empty template and replaying the tenant stream (``--history``
    revisions, default 20, after the initial one): medians over ``--samples`` tenants, interleaved,
    and their ratio.

Run::

    python benchmarks/bench_migrations.py                 # everything
    python benchmarks/bench_migrations.py --quick         # smoke run for CI
    python benchmarks/bench_migrations.py --parts noop --tenants 2000

The server is a throwaway PostgreSQL cluster (``sqla_tenancy.testing.TestServer``), or the superuser
DSN in ``$SQLA_TENANCY_TEST_DSN``. A benchmark, not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import rev_id
from sqlalchemy import Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_ext import init_project, migrate_fleet
from alembic_ext.versions import TENANT
from sqla_tenancy import Tenancy, TenantScoped, tenant_foreign_key
from sqla_tenancy.testing import TestServer

SECRET = "a benchmark key of more than sixteen bytes"
APP = "bench_migrations:tenancy_from_env"
PARTS = ("noop", "revision", "database", "template")


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class Task(TenantScoped, Base):
    __tablename__ = "tasks"
    __table_args__ = (tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column()
    title: Mapped[str] = mapped_column(Text)


class User(TenantScoped, Base):
    __tablename__ = "users"
    __table_args__: ClassVar[dict[str, str]] = {"schema": "auth"}
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)


def tenancy_from_env() -> Tenancy:
    """The benchmark's Tenancy, as worker processes build it (from the environment)."""
    return Tenancy(
        os.environ["BENCH_URL"],
        admin_url=os.environ["BENCH_ADMIN_URL"],
        metadata=Base.metadata,
        infrastructure_schemas=("auth",),
        name_prefix=os.environ["BENCH_PREFIX"],
        secret_key=SECRET,
        migrations=os.environ["BENCH_INI"],
        registry_listen=False,
        create_database_strategy="file_copy",
    )


@dataclass
class Fleet:
    tenancy: Tenancy
    ini: Path
    database: str

    def config(self) -> Config:
        cfg = Config(str(self.ini), stdout=io.StringIO())  # no "Generating ..." lines
        cfg.attributes["tenancy"] = self.tenancy
        return cfg

    def add_revision(self, body: str) -> str:
        script = ScriptDirectory.from_config(self.config())
        code = textwrap.indent(textwrap.dedent(body).strip(), "    ").lstrip()
        with contextlib.redirect_stdout(io.StringIO()):  # no "Generating ..." line
            created = script.generate_revision(
                rev_id(), "bench", head=f"{TENANT}@head", refresh=True, upgrades=code
            )
        assert created is not None
        return created.revision


def new_fleet(server: TestServer, workdir: Path, *, prefix: str | None = None) -> Fleet:
    """A database with the project's migrations at head (and the environment its workers need)."""
    database = server.create_database()
    prefix = prefix or server.name_prefix(database)
    ini = workdir / database / "alembic.ini"
    ini.parent.mkdir(parents=True)
    init_project("migrations", app=APP, ini=ini)
    ini.write_text(ini.read_text().replace("level = INFO", "level = WARNING"))  # quiet alembic
    os.environ.update(
        BENCH_URL=server.url(database).render_as_string(hide_password=False),
        BENCH_ADMIN_URL=server.url(database, role="admin").render_as_string(hide_password=False),
        BENCH_PREFIX=prefix,
        BENCH_INI=str(ini),
    )
    fleet = Fleet(tenancy_from_env(), ini, database)
    command.upgrade(fleet.config(), "head")
    with contextlib.redirect_stdout(io.StringIO()):
        command.revision(fleet.config(), "initial", autogenerate=True)
    command.upgrade(fleet.config(), "head")
    return fleet


def create_schema_tenants(fleet: Fleet, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        fleet.tenancy.create_tenant(f"s{i:05d}", placement="schema")
    return time.perf_counter() - started


def part_noop(server: TestServer, workdir: Path, tenants: int, repeat: int) -> list[str]:
    fleet = new_fleet(server, workdir)
    seconds = create_schema_tenants(fleet, tenants)
    print(f"\nnoop: {tenants} schema tenants created in {seconds:.1f} s")
    fleet_s: list[float] = []
    visit_s: list[float] = []
    for round_no in range(repeat):
        order = ("fleet", "visit") if round_no % 2 == 0 else ("visit", "fleet")
        for variant in order:
            started = time.perf_counter()
            if variant == "fleet":
                report = migrate_fleet(fleet.tenancy, fleet.ini)
                assert report.ok and report.skipped_at_target == tenants + 1, report.counts()
                fleet_s.append(time.perf_counter() - started)
            else:
                command.upgrade(fleet.config(), "head")
                visit_s.append(time.perf_counter() - started)
    fm, vm = statistics.median(fleet_s), statistics.median(visit_s)
    print(f"  migrate_fleet, nothing to apply:        median {fm * 1000:8.1f} ms  ({repeat} runs)")
    print(
        f"  alembic upgrade head, every location:   median {vm * 1000:8.1f} ms  "
        f"({vm / tenants * 1000:.2f} ms/tenant)"
    )
    print(f"  ratio visit / fleet: {vm / fm:.1f}x")
    fleet.tenancy.dispose()
    return [
        f"no-op check, {tenants} tenants: {fm * 1000:.0f} ms (visiting every location: {vm * 1000:.0f} ms)"
    ]


def run_revision(fleet: Fleet, jobs: int, count: int, column: str) -> tuple[float, float]:
    fleet.add_revision(
        f"""
        op.add_column("projects", sa.Column("{column}", sa.Integer(), nullable=True))
        op.create_index("ix_projects_{column}", "projects", ["{column}"])
        """
    )
    started = time.perf_counter()
    report = migrate_fleet(APP, fleet.ini, jobs=jobs)
    wall = time.perf_counter() - started
    upgraded = [o for o in report.outcomes if o.status == "upgraded" and o.kind not in ("main", "template")]
    assert report.ok and len(upgraded) == count, report.counts()
    if report.worker_start_seconds:
        print(f"  (--jobs {jobs}: worker processes ready after {report.worker_start_seconds:.2f} s)")
    return wall, statistics.median(o.seconds for o in upgraded)


def part_revision(server: TestServer, workdir: Path, tenants: int) -> list[str]:
    fleet = new_fleet(server, workdir)
    seconds = create_schema_tenants(fleet, tenants)
    print(f"\nrevision: {tenants} schema tenants created in {seconds:.1f} s")
    lines = []
    for jobs, column in ((2, "c_jobs2"), (1, "c_jobs1")):
        wall, median = run_revision(fleet, jobs, tenants, column)
        per = wall / tenants * 1000
        print(
            f"  --jobs {jobs}: {wall:6.2f} s total, {per:5.2f} ms per tenant (wall), "
            f"median per location {median * 1000:.2f} ms"
        )
        lines.append(f"one revision, {tenants} schema tenants, jobs {jobs}: {per:.2f} ms/tenant")
    fleet.tenancy.dispose()
    return lines


def part_database(server: TestServer, workdir: Path, tenants: int) -> list[str]:
    fleet = new_fleet(server, workdir)
    fleet.tenancy.prepare_server(server.superuser_url)
    started = time.perf_counter()
    for i in range(tenants):
        fleet.tenancy.create_tenant(f"d{i:04d}", placement="database")
    print(f"\ndatabase: {tenants} database tenants created in {time.perf_counter() - started:.1f} s")
    wall, median = run_revision(fleet, 2, tenants, "c_db")
    print(
        f"  --jobs 2: {wall:6.2f} s total, {wall / tenants * 1000:.1f} ms per tenant (wall), "
        f"median per tenant {median * 1000:.1f} ms"
    )
    fleet.tenancy.dispose()
    return [f"one revision, {tenants} database tenants, jobs 2: {wall:.1f} s, median {median * 1000:.1f} ms"]


def part_template(server: TestServer, workdir: Path, history: int, samples: int) -> list[str]:
    fleet = new_fleet(server, workdir)
    for i in range(history):
        fleet.add_revision(f'op.add_column("projects", sa.Column("h{i:03d}", sa.Integer(), nullable=True))')
    command.upgrade(fleet.config(), "head")
    t = fleet.tenancy
    t.prepare_server(server.superuser_url)
    # A second template without the tenant tables (and unstamped): provisioning from it gives an
    # empty database, brought to head by replaying the tenant stream. The two templates swap names
    # between samples (outside the timings) so that the variants interleave.
    template = f"{t.name_prefix}_template"
    server.execute(f'CREATE DATABASE "{template}_empty" TEMPLATE "{template}" OWNER "{server.admin_role}"')
    server.execute(
        "DROP TABLE public.tasks, public.projects; DROP TABLE tenancy.alembic_tenant",
        database=f"{template}_empty",
    )
    current = "full"

    def use(kind: str) -> None:
        nonlocal current
        if kind != current:
            other = "full" if kind == "empty" else "empty"
            server.execute(f'ALTER DATABASE "{template}" RENAME TO "{template}_{other}"')
            server.execute(f'ALTER DATABASE "{template}_{kind}" RENAME TO "{template}"')
            current = kind

    from_template: list[float] = []
    replayed: list[float] = []
    for i in range(samples):
        order = ("template", "replay") if i % 2 == 0 else ("replay", "template")
        for variant in order:
            if variant == "template":
                use("full")
                started = time.perf_counter()
                t.create_tenant(f"tpl{i:03d}", placement="database")
                from_template.append(time.perf_counter() - started)
            else:
                use("empty")
                started = time.perf_counter()
                t.create_tenant(f"rep{i:03d}", placement="database")
                report = migrate_fleet(t, fleet.ini, streams=(TENANT,), tenants=[f"rep{i:03d}"])
                replayed.append(time.perf_counter() - started)
                assert report.ok and report.outcomes[0].status == "upgraded", report.as_dict()
    use("full")
    tm, rm = statistics.median(from_template), statistics.median(replayed)
    print(f"\ntemplate: a tenant stream of {history + 2} revisions; {samples} tenants each way")
    print(f"  create_tenant from the template at head:       median {tm * 1000:7.1f} ms")
    print(f"  create_tenant from an empty template + replay: median {rm * 1000:7.1f} ms")
    print(f"  ratio replay / template: {rm / tm:.2f}x")
    t.dispose()
    return [f"database tenant from template {tm * 1000:.0f} ms vs replay {rm * 1000:.0f} ms ({rm / tm:.2f}x)"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--revision-tenants", type=int, default=500)
    parser.add_argument("--database-tenants", type=int, default=200)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if args.quick:
        args.tenants, args.repeat, args.revision_tenants = 20, 2, 10
        args.database_tenants, args.history, args.samples = 3, 3, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # The throwaway cluster holds the benchmark's other databases, open to PUBLIC: provisioning's
    # warning about each one a tenant role could open is right, and noise here.
    logging.getLogger("sqla_tenancy.isolation").setLevel(logging.ERROR)
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # workers import this module by name
    server = TestServer.start()
    summary: list[str] = []
    try:
        with server.superuser.connect() as conn:
            version = conn.execute(text("show server_version")).scalar_one()
        print(
            f"sqla-tenancy migration benchmark: python {sys.version.split()[0]}, PostgreSQL {version}, "
            f"{os.cpu_count()} CPUs, parts {','.join(args.parts)}{' (quick)' if args.quick else ''}"
        )
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            if "noop" in args.parts:
                summary += part_noop(server, workdir, args.tenants, args.repeat)
            if "revision" in args.parts:
                summary += part_revision(server, workdir, args.revision_tenants)
            if "database" in args.parts:
                summary += part_database(server, workdir, args.database_tenants)
            if "template" in args.parts:
                summary += part_template(server, workdir, args.history, args.samples)
    finally:
        server.stop()
    print("\nsummary:")
    for line in summary:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
