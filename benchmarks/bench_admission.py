"""What each form of a shared tenant's binding costs the server, measured side by side in one run.

Below SQLAlchemy: one psycopg connection as the application role (NOSUPERUSER NOBYPASSRLS) runs
transactions of ``<binding>`` (one simple-protocol query), a prepared primary-key ``SELECT`` of a
tenant-scoped row, ``COMMIT``. The forms, all on that same connection (so the same backend):

``limit``
    ``BEGIN`` alone; the connection carries the tenant from connect time
    (``options=-c app.current_tenant_id=<uuid>``): the denominator;
``pins``
    ``BEGIN; SET LOCAL search_path = DEFAULT; SET LOCAL ROLE NONE; SET LOCAL app.current_tenant_id``;
``select``
    what bindings sent before this version: ``SET LOCAL ROLE NONE; SELECT
    tenancy.admit_tenant(<uuid>, 'shared')`` in front of the pins (a PL/pgSQL function: the
    server parses, plans and runs a ``SELECT`` and returns a row; the function runs two queries);
``call``
    what the router sends now (:func:`sqla_tenancy.binding.admitted_binding`): the pins, with
    ``CALL tenancy.admit(<uuid>, 'shared')`` between the role and the tenant setting (a utility
    statement: no plan, no row; the procedure runs one query).

Two floors, for what any other form of the admission could cost (they admit nothing):

``noop``
    the ``call`` form with a PL/pgSQL procedure that does nothing: one more statement and a call;
``lock``
    the pins followed by ``SELECT pg_try_advisory_xact_lock_shared(...)`` alone: an admission by
    the lock, without looking at the registry.

Each form is timed in interleaved rounds (the order rotates every round). Besides the wall time
per transaction, the script reads the server backend's own CPU time from
``/proc/<pid>/schedstat`` (Linux, client and server on one machine), which the client's share of
the machine's cores does not blur: the paired median difference to ``limit`` is the server's cost
of the form. Run::

    python benchmarks/bench_admission.py              # 40 rounds x 200 transactions
    python benchmarks/bench_admission.py --quick      # smoke run

This is a benchmark, not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
from bench_binding import Base, Project  # the same model and table

from sqla_tenancy import Tenancy, tenant_context
from sqla_tenancy.binding import ADMIT_PROCEDURE, admit_statement, admitted_binding, binding_statement
from sqla_tenancy.identifiers import quote_literal
from sqla_tenancy.locks import serving_key
from sqla_tenancy.testing import TestServer

FORMS = ("limit", "pins", "select", "call", "noop", "lock")
NOOP_PROCEDURE = "tenancy.bench_admission_noop"


def server_cpu_ns(pid: int) -> int | None:
    """The backend's time on a CPU so far (``None`` where ``/proc`` does not say)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a few short rounds: a smoke run for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round = 3, 50
    server = TestServer.start()
    tenancy: Tenancy | None = None
    try:
        database = server.create_database()
        tenancy = server.tenancy(database, Base.metadata)
        tenancy.install()
        acme = tenancy.create_tenant("acme")
        maker = tenancy.sessionmaker()
        with tenant_context("acme"), maker() as s:
            projects = [Project(name=f"p{i}") for i in range(1000)]
            s.add_all(projects)
            s.commit()
            pks = [p.id for p in projects]
        server.execute("ANALYZE projects", database=database)
        server.execute(
            f"CREATE PROCEDURE {NOOP_PROCEDURE}(tenant uuid, placement text) "
            "LANGUAGE plpgsql AS $$ BEGIN END $$; "
            f"GRANT EXECUTE ON PROCEDURE {NOOP_PROCEDURE}(uuid, text) TO {server.app_role}",
            database=database,
        )
        pins = binding_statement(acme.id)
        call = admitted_binding(admit_statement(acme.id, placement="shared", call=True), pins)
        forms: dict[str, bytes] = {
            "limit": b"BEGIN",
            "pins": b"BEGIN; " + pins,
            "select": b"BEGIN; " + admit_statement(acme.id, placement="shared") + b"; " + pins,
            "call": b"BEGIN; " + call,
            "noop": b"BEGIN; "
            + call.replace(f"CALL {ADMIT_PROCEDURE}(".encode(), f"CALL {NOOP_PROCEDURE}(".encode()),
            "lock": b"BEGIN; "
            + pins
            + f"; SELECT pg_catalog.pg_try_advisory_xact_lock_shared("
            f"pg_catalog.hashtext({quote_literal(serving_key(acme.id))}))".encode(),
        }
        if forms["noop"] == forms["call"]:
            raise SystemExit("noop: the binding no longer CALLs the admission procedure")
        url = server.url(database)
        conn = psycopg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            dbname=url.database,
            options=f"-c app.current_tenant_id={acme.id}",
            autocommit=True,
        )
        pid = conn.info.backend_pid
        pgconn = conn.pgconn
        query = "select name from projects where id = %s"

        def run(form: str, batch: list[int]) -> tuple[float, float | None]:
            binding = forms[form]
            cpu0 = server_cpu_ns(pid)
            start = time.perf_counter_ns()
            for pk in batch:
                result = pgconn.exec_(binding)
                if result.status not in (1, 2):  # COMMAND_OK, TUPLES_OK
                    raise SystemExit(f"{form}: {result.error_message.decode()}")
                if conn.execute(query, (pk,), prepare=True).fetchone() is None:
                    raise SystemExit(f"{form}: the tenant's row is not visible")
                pgconn.exec_(b"COMMIT")
            wall = (time.perf_counter_ns() - start) / len(batch) / 1000
            cpu1 = server_cpu_ns(pid)
            cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / len(batch) / 1000
            return wall, cpu

        for form in FORMS:
            run(form, pks[:200])
        wall: dict[str, list[float]] = {f: [] for f in FORMS}
        cpu: dict[str, list[float]] = {f: [] for f in FORMS}
        for round_no in range(args.rounds):
            base = round_no * args.per_round
            batch = [pks[(base + i) % len(pks)] for i in range(args.per_round)]
            order = FORMS[round_no % len(FORMS) :] + FORMS[: round_no % len(FORMS)]
            for form in order:
                gc.collect()
                w, c = run(form, batch)
                wall[form].append(w)
                if c is not None:
                    cpu[form].append(c)
        conn.close()
        print(
            f"sqla-tenancy admission benchmark: python {sys.version.split()[0]}, "
            f"{args.rounds} rounds x {args.per_round} transactions, one connection as the application role"
        )
        print(f"  {'form':8s} {'wall µs':>9s} {'+µs':>7s} {'server µs':>10s} {'+µs':>7s}")
        for form in FORMS:
            line = (
                f"  {form:8s} {statistics.median(wall[form]):9.1f} {_paired(wall[form], wall['limit']):+7.1f}"
            )
            if cpu[form]:
                line += f" {statistics.median(cpu[form]):10.1f} {_paired(cpu[form], cpu['limit']):+7.1f}"
            print(line)
        if cpu["call"]:
            saved = _paired(cpu["select"], cpu["call"])
            print(
                f"\nserver time the CALL form saves over the SELECT form: {saved:.1f} µs "
                "per transaction (paired median); of the admission's "
                f"{_paired(cpu['call'], cpu['pins']):.1f} µs over the pins, a procedure that does nothing "
                f"costs {_paired(cpu['noop'], cpu['pins']):.1f} and the lock alone, as a SELECT, "
                f"{_paired(cpu['lock'], cpu['pins']):.1f}"
            )
        return 0
    finally:
        if tenancy is not None:
            tenancy.dispose()
        server.stop()


def _paired(values: list[float], base: list[float]) -> float:
    return statistics.median(a - b for a, b in zip(values, base, strict=True))


if __name__ == "__main__":
    sys.exit(main())
