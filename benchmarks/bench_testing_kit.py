"""What a tenant test costs with the pytest plugin's fixtures, per placement, against a fresh
database per test.

The script writes a small project into a temporary directory (a model, its ``Tenancy``, a pytest
ini naming it) and a test module of ``--tests`` tenant tests per placement, each doing what a
typical test does: write two projects and a task through a session, ``commit()``, read them back.
``kit, database, fresh=True`` provisions a database tenant per test (cloned from the server's
template database) instead of emptying a pooled one. The baseline runs the same test body on a
fresh database per test (``tenancy_factory`` +
``install()`` + ``create_tenant``), as a suite without the kit would. Each group runs in a pytest
subprocess; a hook records every test's setup + call + teardown time.

Printed per group: wall time of the pytest run (server start included), and the mean and median
milliseconds per test after the first ``--warmup`` tests (and without the last, whose teardown
stops the server).

Run::

    python benchmarks/bench_testing_kit.py                       # 200 tests per placement
    python benchmarks/bench_testing_kit.py --tests 50 --fresh 10 --baseline 10

This is a benchmark, not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = """
from sqlalchemy import Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_tenancy import Tenancy, TenantScoped, tenant_foreign_key


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
    project_id: Mapped[int]
    title: Mapped[str] = mapped_column(Text)


tenancy = Tenancy(
    "postgresql+psycopg://app@db.invalid/app",
    metadata=Base.metadata,
    secret_key="benchmark secret key of 32+ bytes",
)
"""

CONFTEST = """
import json
import os

import pytest

TIMES = {}


@pytest.hookimpl
def pytest_runtest_logreport(report):
    TIMES[report.nodeid] = TIMES.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    with open(os.environ["BENCH_TIMES"], "w") as fh:
        json.dump(TIMES, fh)
"""

TESTS = """
import pytest
from sqlalchemy import select

from benchapp import Base, Project, Task, tenancy
from sqla_tenancy import tenant_context

N = {n}


def work(session):
    assert session.scalars(select(Project)).all() == []
    p = Project(name="a")
    session.add_all([p, Project(name="b")])
    session.flush()
    session.add(Task(project_id=p.id, title="t"))
    session.commit()
    assert len(session.scalars(select(Project)).all()) == 2


@pytest.mark.parametrize("i", range(N))
@pytest.mark.tenant(placement="{placement}")
def test_kit(i, app_tenancy, tenant):
    with app_tenancy.sessionmaker()() as session:
        work(session)


@pytest.mark.parametrize("i", range(N))
@pytest.mark.tenant(placement="{placement}", fresh=True)
def test_fresh_tenant(i, app_tenancy, tenant):
    with app_tenancy.sessionmaker()() as session:
        work(session)


@pytest.mark.parametrize("i", range({baseline}))
def test_fresh_database(i, tenancy_factory):
    t = tenancy_factory(Base.metadata, secret_key="benchmark secret key of 32+ bytes")
    t.install()
    made = t.create_tenant("acme")
    with tenant_context(made), t.sessionmaker()() as session:
        work(session)
"""


def run_group(
    project: Path, placement: str, tests: int, baseline: int, select: str
) -> tuple[float, list[float]]:
    (project / "tests" / "test_bench.py").write_text(
        TESTS.format(n=tests, placement=placement, baseline=baseline)
    )
    times = project / "times.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(project), str(ROOT)])
    env["BENCH_TIMES"] = str(times)
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:pytest_alembic",
            "-k",
            select,
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"pytest failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    per_test = list(json.loads(times.read_text()).values())
    return wall, [t * 1000 for t in per_test]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tests", type=int, default=200, help="tenant tests per placement")
    parser.add_argument("--baseline", type=int, default=30, help="fresh-database tests")
    parser.add_argument("--fresh", type=int, default=50, help="database tests with fresh=True")
    parser.add_argument("--warmup", type=int, default=10, help="tests left out of the per-test figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-testing-kit-") as tmp:
        project = Path(tmp)
        (project / "benchapp.py").write_text(textwrap.dedent(MODELS))
        (project / "tests").mkdir()
        (project / "tests" / "conftest.py").write_text(CONFTEST)
        (project / "pytest.ini").write_text("[pytest]\nsqla_tenancy_app = benchapp:tenancy\n")
        rows = []
        for placement in ("shared", "schema", "database"):
            wall, per = run_group(project, placement, args.tests, args.baseline, "test_kit")
            rows.append((f"kit, {placement}", len(per), wall, per))
        wall, per = run_group(project, "database", args.fresh, args.baseline, "test_fresh_tenant")
        rows.append(("kit, database, fresh=True", len(per), wall, per))
        wall, per = run_group(project, "shared", 0, args.baseline, "test_fresh_database")
        rows.append(("fresh database per test", len(per), wall, per))
    header = f"{'group':<26} {'tests':>5} {'wall s':>8} {'mean ms':>9} {'median ms':>10}"
    print(f"{header}  (after {args.warmup} warm-up)")
    for name, count, wall, per in rows:
        steady = per[args.warmup : -1] or per  # the last one carries the session teardown
        mean, median = statistics.mean(steady), statistics.median(steady)
        print(f"{name:<26} {count:>5} {wall:>8.1f} {mean:>9.1f} {median:>10.1f}")


if __name__ == "__main__":
    main()
