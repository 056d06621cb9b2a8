"""What a role change on the cluster costs the schema tenants' next transaction on each connection.

A schema tenant's binding switches role (``SET LOCAL ROLE <tenant role>``), and PostgreSQL checks
that the login role may: the application role is a member of every schema tenant's role, and
each backend keeps the list of roles its login role may switch to in a cache, which any change of
a role or a role membership on the cluster empties (``CREATE ROLE``, ``GRANT <role> TO``,
``DROP ROLE``: every provisioning and deletion of a schema or database tenant makes some). The
next ``SET ROLE`` on that backend rebuilds the list, one catalog look-up per role reachable from
the login role: its cost grows with the number of schema tenants.

At each fleet size (``--sizes``, schema tenants created with ``create_tenant``), on one pooled
connection of the application engine, this times the one-statement transaction of a schema
tenant (``tenant_context`` + ``tenancy.connect()``, ``select 1``, commit):

``steady``
    the median of 200, nothing changing;
``after one``
    the first transaction after another schema tenant was created (10 times; median and max), and
    the second one after it;
``after ten``
    the first transaction after ten tenants were created in a row (3 times): the list is rebuilt
    once however many changes came before;
``shared after one``
    a shared tenant's first transaction after one creation (its binding resets the role, which
    needs no membership check).

Run::

    TMPDIR=/dev/shm python benchmarks/bench_role_cache.py                 # 10, 1000, 3000, 5000 tenants
    python benchmarks/bench_role_cache.py --quick                         # smoke run (seconds)

A benchmark, not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Sequence

from bench_schema import INFRASTRUCTURE, Base
from sqlalchemy import text

from sqla_tenancy import Tenancy, tenant_context
from sqla_tenancy.testing import TestServer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,3000,5000", help="schema tenants at each step")
    parser.add_argument("--quick", action="store_true", help="10 and 200 tenants: a smoke run")
    args = parser.parse_args(argv)
    sizes = [10, 200] if args.quick else [int(size) for size in args.sizes.split(",")]
    logging.getLogger("sqla_tenancy.isolation").setLevel(logging.ERROR)
    server = TestServer.start()
    tenancy: Tenancy | None = None
    try:
        database = server.create_database()
        tenancy = server.tenancy(
            database, Base.metadata, infrastructure_schemas=INFRASTRUCTURE, registry_listen=False
        )
        tenancy.install()
        tenancy.create_tenant("shared")
        made = 0

        def create(count: int) -> None:
            nonlocal made
            assert tenancy is not None
            for _ in range(count):
                made += 1
                tenancy.create_tenant(f"s{made:05d}", placement="schema")

        def transaction(slug: str) -> float:
            assert tenancy is not None
            start = time.perf_counter()
            with tenant_context(slug), tenancy.connect() as conn:
                conn.execute(text("select 1"))
                conn.commit()
            return (time.perf_counter() - start) * 1000

        print("schema tenants | steady | after one (max) | second | after ten | shared after one   (ms)")
        for size in sizes:
            create(max(0, size - made))
            at = made
            for _ in range(50):
                transaction("s00001")
            steady = statistics.median(transaction("s00001") for _ in range(200))
            after_one, second, shared_after = [], [], []
            for _ in range(10):
                create(1)
                after_one.append(transaction("s00001"))
                second.append(transaction("s00001"))
            for _ in range(5):
                create(1)
                shared_after.append(transaction("shared"))
            after_ten = []
            for _ in range(3):
                create(10)
                after_ten.append(transaction("s00001"))
            print(
                f"{at:>14} | {steady:6.2f} | {statistics.median(after_one):6.2f} ({max(after_one):6.2f}) | "
                f"{statistics.median(second):6.2f} | {statistics.median(after_ten):9.2f} | "
                f"{statistics.median(shared_after):6.2f}",
                flush=True,
            )
    finally:
        if tenancy is not None:
            tenancy.dispose()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
