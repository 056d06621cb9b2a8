"""Where one engine-cache miss of a database tenant goes: cProfile, one thread.

One thread cycles over ``--tenants`` database tenants (default 40) with ``max_tenant_engines``
``--engines`` (default 10), ``tenant_pool_size=1``, ``tenant_max_overflow=0``: after a warm-up that
makes every tenant's engine, every timed transaction misses the cache and revives an engine that
was pushed out (its dialect is initialised already; its connection was closed). The
transactions are one ``select count(*) from projects`` through a TenantSession, as in
``bench_database.py``'s round-robin part. Three setups, each run twice, alternating: the tenant
roles' SCRAM verifiers of 4096 iterations, direct; of 1 iteration, direct; of 1 iteration, through
a PgBouncer (``tenant_poolers``; see ``bench_database.start_bouncer``). Per setup, in ms per
transaction: the median of a cached tenant's transaction (no profiler), the wall time of a miss
(under the profiler, so inflated), and from the profile: ``psycopg.connect`` (cumulative), the
time spent in psycopg's connection generator itself (libpq's ``PQconnectPoll``, where the SCRAM
proof is computed, holding the GIL), the dialect's connect hook (the pooler check), the closing of
connections, and the engine cache's ``get``.

Run::

    python benchmarks/profile_tenant_miss.py
    python benchmarks/profile_tenant_miss.py --tenants 60 --engines 20 --tx 600
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import statistics
import time
from collections.abc import Sequence
from typing import Any

import bench_database as bd
from sqlalchemy import func, select

from sqla_tenancy import Tenancy, tenant_context
from sqla_tenancy.testing import TestServer

SETUPS = (("SCRAM 4096, direct", 4096, False), ("SCRAM 1, direct", 1, False), ("SCRAM 1, PgBouncer", 1, True))


def profiled(stats: pstats.Stats, file: str, name: str) -> tuple[float, float]:
    """(own time, cumulative time) of the function ``name`` defined in a file ending in ``file``."""
    for (path, _line, function), (_cc, _nc, own, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if path.endswith(file) and function == name:
            return own, cumulative
    return 0.0, 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tenants", type=int, default=40)
    parser.add_argument("--engines", type=int, default=10)
    parser.add_argument("--tx", type=int, default=400, help="profiled transactions per setup and run")
    args = parser.parse_args(argv)
    logging.getLogger("sqla_tenancy.isolation").setLevel(logging.ERROR)
    server = TestServer.start()
    tenancy: Tenancy | None = None
    try:
        database = server.create_database()
        prefix = server.name_prefix(database)
        tenancy = Tenancy(
            server.url(database),
            admin_url=server.url(database, role="admin"),
            metadata=bd.Base.metadata,
            infrastructure_schemas=bd.INFRASTRUCTURE,
            secret_key=bd.SECRET,
            name_prefix=prefix,
            create_database_strategy="file_copy",
        )
        tenancy.install()
        tenancy.prepare_server(server.superuser_url)
        fx = bd.Fixture(server, database, prefix, tenancy)
        fx.ensure_tenants(args.tenants)
        statement = select(func.count()).select_from(bd.Project)
        rows: dict[str, list[dict[str, float]]] = {}
        for label, iterations, pooler in SETUPS * 2:
            if pooler and not bd.PgBouncer.available():
                continue
            bd.set_role_iterations(fx, fx.slugs, iterations)
            bouncer = bd.start_bouncer(fx, fx.slugs) if pooler else None
            options: dict[str, Any] = {}
            if bouncer is not None:
                options = {
                    "tenant_poolers": {"main": f"postgresql://{bouncer.host}:{bouncer.port}"},
                    "engine_options": {"connect_args": {"prepare_threshold": None}},
                }
            t = fx.make_tenancy(
                max_tenant_engines=args.engines, tenant_pool_size=1, tenant_max_overflow=0, **options
            )
            maker = t.sessionmaker()

            def tx(slug: str, maker: Any = maker) -> None:
                with tenant_context(slug), maker() as s:
                    s.scalar(statement)
                    s.commit()

            try:
                for slug in fx.slugs * 2:
                    tx(slug)
                hits = []
                for _ in range(200):
                    start = time.perf_counter()
                    tx(fx.slugs[0])
                    hits.append(time.perf_counter() - start)
                profile = cProfile.Profile()
                profile.enable()
                start = time.perf_counter()
                for i in range(args.tx):
                    tx(fx.slugs[i % len(fx.slugs)])
                wall = time.perf_counter() - start
                profile.disable()
            finally:
                t.dispose()
                if bouncer is not None:
                    bouncer.stop()
            stats = pstats.Stats(profile)

            def ms(seconds: float) -> float:
                return 1000 * seconds / args.tx

            rows.setdefault(label, []).append(
                {
                    "a cached tenant's transaction (no profiler)": 1000 * statistics.median(hits),
                    "a transaction that misses (wall, profiled)": ms(wall),
                    "psycopg.connect": ms(profiled(stats, "psycopg/connection.py", "connect")[1]),
                    "  in the connection generator (libpq, SCRAM)": ms(
                        profiled(stats, "psycopg/_connection_base.py", "_connect_gen")[0]
                    ),
                    "the dialect's connect hook (pooler check)": ms(
                        profiled(stats, "sqla_tenancy/dialect.py", "connect")[1]
                    ),
                    "closing connections": ms(profiled(stats, "psycopg/connection.py", "close")[1]),
                    "engine cache get (revival, eviction)": ms(
                        profiled(stats, "sqla_tenancy/engines.py", "get")[1]
                    ),
                }
            )
        print(
            f"profile_tenant_miss: {args.tenants} database tenants, {args.engines} engines, one thread, "
            f"{args.tx} profiled transactions per run (ms per transaction; each setup's two runs)"
        )
        for label, runs in rows.items():
            print(label)
            for key in runs[0]:
                print(f"  {key:<46} " + "  ".join(f"{run[key]:6.2f}" for run in runs))
        return 0
    finally:
        if tenancy is not None:
            tenancy.dispose()
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
