"""Instant database tenants: ``create_tenant(placement="database")`` claiming a pending tenant
from the pool (a hit) against provisioning one (a miss): N creations that empty a pool of N, then
N more; medians.

    python benchmarks/bench_pool.py [--tenants 20] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqla_tenancy.testing import TestServer
from tests.models import INFRASTRUCTURE, Base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=20, help="tenants created per arm")
    parser.add_argument("--quick", action="store_true", help="3 per arm (a smoke run)")
    args = parser.parse_args()
    count = 3 if args.quick else args.tenants
    logging.getLogger("sqla_tenancy.isolation").setLevel(logging.ERROR)
    server = TestServer.start()
    tenancy = None
    try:
        database = server.create_database()
        tenancy = server.tenancy(
            database,
            Base.metadata,
            infrastructure_schemas=INFRASTRUCTURE,
            secret_key="bench-pool-secret-key-of-enough-length",
        )
        tenancy.install()
        tenancy.prepare_server(server.superuser_url)
        tenancy.create_tenant("warmup", placement="database")  # template refreshed, engines warm
        started = time.perf_counter()
        tenancy.fill_pool(count)
        fill_s = time.perf_counter() - started
        hits: list[float] = []
        misses: list[float] = []
        for arm, times in (("hit", hits), ("miss", misses)):  # the pool is empty after the hits
            for i in range(count):
                started = time.perf_counter()
                made = tenancy.create_tenant(f"{arm}{i}", placement="database")
                times.append((time.perf_counter() - started) * 1000)
                assert made.placement == "database"
            left = len(tenancy.pending_tenants())
            print(f"after the {arm} arm: {left} pending tenant(s) left")
        print(f"{count} pending database tenants provisioned ahead in {fill_s:.1f} s")
        print(f"create_tenant(placement='database'), median of {count}:")
        print(f"  first {count} calls (pool hits)   {statistics.median(hits):7.1f} ms")
        print(f"  next {count} calls (pool empty)   {statistics.median(misses):7.1f} ms")
    finally:
        if tenancy is not None:
            tenancy.dispose()
        server.stop()


if __name__ == "__main__":
    main()
