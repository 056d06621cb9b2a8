"""What the audit trail's triggers cost per write, measured side by side in one run.

Writes to ``projects`` (shared placement, RLS on), as the admin role inside
``platform_context`` (every statement audited) and as the application role for a tenant (the
triggers fire, find nothing to record, and return), each with and without the audit triggers
installed on the table:

``insert-1``   one single-row INSERT per transaction
``insert-1000`` one 1000-row INSERT ... SELECT generate_series per transaction
``update-1000`` one UPDATE of 1000 rows per transaction

Run::

    python benchmarks/bench_audit.py            # 7 rounds
    python benchmarks/bench_audit.py --quick

The server is a throwaway cluster (``sqla_tenancy.testing.TestServer``). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Connection, text

from sqla_tenancy import platform_context, tenant_context
from sqla_tenancy.audit import trigger_ddl
from sqla_tenancy.testing import TestServer
from tests.models import INFRASTRUCTURE, Base

STATEMENTS = {
    "insert-1": "insert into projects (name, tenant_id) values ('x', :t)",
    "insert-1000": (
        "insert into projects (name, tenant_id) select 'x' || g, :t from generate_series(1, 1000) g"
    ),
    "update-1000": (
        "update projects set name = name "
        "where id in (select id from projects where tenant_id = :t limit 1000)"
    ),
}


def timed(conn_factory: Callable[[], Connection], sql: str, tenant_id: object, n: int) -> float:
    with conn_factory() as conn:
        start = time.perf_counter()
        for _ in range(n):
            conn.execute(text(sql), {"t": tenant_id})
            conn.commit()
        return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    server = TestServer.start()
    try:
        database = server.create_database()
        t = server.tenancy(
            database,
            Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
            secret_key="a benchmark key of more than sixteen bytes",
            registry_listen=False,
        )
        t.install()
        acme = t.create_tenant("acme")
        with t.admin_engine.begin() as conn:
            conn.execute(
                text(
                    "insert into projects (name, tenant_id) select 'seed', :t from generate_series(1, 5000)"
                ),
                {"t": acme.id},
            )
        t.install_audit()  # the trail (and the triggers on every table), then choose per variant

        def set_triggers(on: bool) -> None:
            with t.admin_engine.begin() as conn:
                for statement in trigger_ddl("projects", "tenant_id") if on else []:
                    conn.exec_driver_sql(statement)
                if not on:
                    for op in ("insert", "update", "delete"):
                        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS tenancy_audit_{op} ON projects")

        results: dict[tuple[str, str, bool], list[float]] = {}
        for round_ in range(rounds):
            for triggers in (False, True) if round_ % 2 == 0 else (True, False):
                set_triggers(triggers)
                for name, sql in STATEMENTS.items():
                    n = 200 if name == "insert-1" else 20
                    with platform_context("benchmark"):
                        results.setdefault((name, "platform", triggers), []).append(
                            timed(t.admin_engine.connect, sql, acme.id, n)
                        )
                    with tenant_context("acme"):
                        results.setdefault((name, "tenant", triggers), []).append(
                            timed(t.engine.connect, sql, acme.id, n)
                        )
        header = ("statement", "writer", "no triggers", "triggers", "cost", "paired")
        print("{:<12} {:<9} {:>12} {:>12} {:>10} {:>7}".format(*header))
        for name in STATEMENTS:
            for writer in ("platform", "tenant"):
                offs, ons = results[(name, writer, False)], results[(name, writer, True)]
                off, on = statistics.median(offs) * 1e6, statistics.median(ons) * 1e6
                paired = statistics.median(b / a for a, b in zip(offs, ons, strict=True))
                cost = on - off
                print(f"{name:<12} {writer:<9} {off:>10.0f}us {on:>10.0f}us {cost:>+8.0f}us {paired:>7.2f}")
        with t.admin_engine.connect() as conn:
            rows = conn.execute(text("select count(*) from tenancy.audit_log")).scalar()
        print(f"audit entries written: {rows}")
        t.dispose()
        server.drop_database(database)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
