"""Moving a tenant of ``--rows`` rows over 3 tenant tables from the shared placement to a database
of its own and back (``move_tenant``): the time of each move and its read-only window, the time
the tenant could not write (from the commit of the read-only policies to the switch's commit, as
the move logs it, and as a writer probing every 20 ms saw it: first to last refused write).

    python benchmarks/bench_move.py [--rows 100000] [--rounds 3] [--quick]

Figures are medians over the rounds; the machine may be shared, so treat them as orders of size.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Index, Text, exc, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_tenancy import Tenancy, TenantScoped, tenant_context, tenant_foreign_key
from sqla_tenancy.testing import TestServer


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class Task(TenantScoped, Base):
    __tablename__ = "tasks"
    __table_args__ = (
        tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),
        # the referencing columns indexed, as an application would: removing a shared source
        # deletes its rows, and each deleted parent row looks for its children
        Index("tasks_project", "tenant_id", "project_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int]
    title: Mapped[str] = mapped_column(Text)


class Comment(TenantScoped, Base):
    __tablename__ = "comments"
    __table_args__ = (
        tenant_foreign_key(["task_id"], ["tasks.id"], ondelete="CASCADE"),
        Index("comments_task", "tenant_id", "task_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int]
    body: Mapped[str] = mapped_column(Text)


class User(TenantScoped, Base):
    __tablename__ = "users"
    __table_args__ = ({"schema": "auth"},)
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)


class MoveLog(logging.Handler):
    """Collects the (total, read-only) seconds the move logs."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"in ([\d.]+) s \(read-only for ([\d.]+) s\)", record.getMessage())
        if found:
            self.figures.append((float(found.group(1)), float(found.group(2))))


def seed(tenancy: Tenancy, slug: str, rows: int) -> None:
    """``rows`` rows over the three tables (1 : 3 : 6), written as the admin in the shared tables."""
    tenant = tenancy.get_tenant(slug)
    projects, tasks = max(1, rows // 10), max(1, rows * 3 // 10)
    comments = max(1, rows - projects - tasks)
    with tenancy.admin_engine.begin() as conn:
        t = {"t": tenant.id}
        conn.execute(
            text(
                "insert into projects (tenant_id, name) "
                "select :t, 'project ' || g from generate_series(1, :n) g"
            ),
            {**t, "n": projects},
        )
        first = conn.execute(text("select min(id) from projects where tenant_id = :t"), t).scalar()
        conn.execute(  # the projects' ids are consecutive: inserted in one statement
            text(
                "insert into tasks (tenant_id, project_id, title) "
                "select :t, :first + g % :p, 'task ' || g from generate_series(1, :n) g"
            ),
            {**t, "first": first, "n": tasks, "p": projects},
        )
        ids = [r for (r,) in conn.execute(text("select id from tasks where tenant_id = :t"), t)]
        conn.execute(
            text(
                "insert into comments (tenant_id, task_id, body) select :t, (:ids)[1 + g % :k], "
                "repeat('comment text ', 4) || g from generate_series(1, :n) g"
            ),
            {**t, "ids": ids, "k": len(ids), "n": comments},
        )


class Prober:
    """Writes as the tenant every 20 ms while a move runs; records when writes were refused."""

    def __init__(self, tenancy: Tenancy, slug: str) -> None:
        self.tenancy, self.slug = tenancy, slug
        self.refused: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        maker = self.tenancy.sessionmaker()
        while not self.stop.is_set():
            try:
                with tenant_context(self.slug), maker() as s:
                    s.execute(text("select count(*) from projects"))
                    s.execute(
                        text("update projects set name = name where id = (select min(id) from projects)")
                    )
                    s.commit()
            except exc.DBAPIError:
                self.refused.append(time.perf_counter())
            time.sleep(0.02)

    def window(self) -> float:
        return self.refused[-1] - self.refused[0] if self.refused else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="the tenant's rows over 3 tables")
    parser.add_argument("--rounds", type=int, default=3, help="round trips shared -> database -> shared")
    parser.add_argument("--quick", action="store_true", help="3000 rows, 1 round (a smoke run)")
    args = parser.parse_args()
    rows, rounds = (3000, 1) if args.quick else (args.rows, args.rounds)
    logging.getLogger("sqla_tenancy.isolation").setLevel(logging.ERROR)
    moves = MoveLog()
    logger = logging.getLogger("sqla_tenancy.lifecycle")
    logger.addHandler(moves)
    logger.setLevel(logging.INFO)
    server = TestServer.start()
    tenancy = None
    try:
        database = server.create_database()
        tenancy = server.tenancy(
            database,
            Base.metadata,
            infrastructure_schemas=("auth",),
            secret_key="bench-move-secret-key-of-enough-length",
        )
        tenancy.install()
        tenancy.prepare_server(server.superuser_url)
        tenancy.create_tenant("warmup", placement="database")  # the template is refreshed
        tenancy.create_tenant("other")
        tenancy.create_tenant("acme")
        seed(tenancy, "other", rows // 10)
        seed(tenancy, "acme", rows)
        with tenancy.admin_engine.connect() as conn:
            counts = conn.execute(
                text(
                    "select (select count(*) from projects where tenant_id = :t), "
                    "(select count(*) from tasks where tenant_id = :t), "
                    "(select count(*) from comments where tenant_id = :t)"
                ),
                {"t": tenancy.get_tenant("acme").id},
            ).one()
        print(
            f"tenant acme: {sum(counts)} rows (projects {counts[0]}, tasks {counts[1]}, comments {counts[2]})"
        )
        stamps: list[tuple[str, float]] = []
        tenancy.on(
            "step",
            lambda e: (
                stamps.append((e.step, time.perf_counter()))
                if e.step and e.step.startswith("move_")
                else None
            ),
        )
        phases: dict[str, dict[str, list[float]]] = {}
        figures: dict[str, list[tuple[float, float, float]]] = {
            "shared -> database": [],
            "database -> shared": [],
        }
        for _ in range(rounds):
            for placement, arm in (("database", "shared -> database"), ("shared", "database -> shared")):
                prober = Prober(tenancy, "acme")
                prober.thread.start()
                time.sleep(0.1)
                stamps.clear()
                started = time.perf_counter()
                tenancy.move_tenant("acme", placement)
                wall = time.perf_counter() - started
                marks = [*stamps, ("end", started + wall)]
                for (step, at), (_, until) in itertools.pairwise(marks):
                    phases.setdefault(arm, {}).setdefault(step, []).append(until - at)
                time.sleep(0.1)
                prober.stop.set()
                prober.thread.join(10)
                _, read_only = moves.figures[-1]
                figures[arm].append((wall, read_only, prober.window()))
        print(f"median of {rounds} round(s):            move     read-only (logged)   refused writes seen")
        for arm, values in figures.items():
            wall = statistics.median(v[0] for v in values)
            logged = statistics.median(v[1] for v in values)
            seen = statistics.median(v[2] for v in values)
            print(f"  {arm:20s}          {wall:6.2f} s   {logged:6.2f} s             {seen:6.2f} s")
        print("median time from each step to the next (s):")
        for arm, steps in phases.items():
            print(f"  {arm}: " + ", ".join(f"{k[5:]} {statistics.median(v):.2f}" for k, v in steps.items()))
    finally:
        if tenancy is not None:
            tenancy.dispose()
        server.stop()


if __name__ == "__main__":
    main()
