"""The shared and schema placements on Citus: one-transaction cost of a TenantSession against a
plain Session on the same cluster, and a tenant's query against a cross-tenant one (interleaved
rounds, medians). The schema tenant's plain Session logs in as the tenant's own role with its
schema as the search_path (what the binding gives a TenantSession per transaction).

Needs Citus built into the test PostgreSQL (python -m sqla_tenancy.testing.citus build TARBALL).

    python benchmarks/bench_citus.py [--rounds 15] [--tx 200] [--quick]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqla_tenancy import Tenancy, platform_context, tenant_context
from sqla_tenancy.identifiers import quote_ident, quote_literal
from sqla_tenancy.testing.citus import CitusCluster, citus_installed
from tests.citus.conftest import Base, Project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tx", type=int, default=200, help="transactions per arm per round")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, per_round = (3, 30) if args.quick else (args.rounds, args.tx)
    if citus_installed() is None:
        print("Citus is not built: python -m sqla_tenancy.testing.citus build <citus-X.Y.Z.tar.gz>")
        return
    with CitusCluster(workers=2) as cluster:
        admin_role, app_role = "bench_admin", "bench_app"
        admin_pw, app_pw = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
        engine = create_engine(cluster.superuser_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(
                f"CREATE ROLE {admin_role} LOGIN CREATEROLE BYPASSRLS PASSWORD {quote_literal(admin_pw)}"
            )
            conn.exec_driver_sql(f"CREATE ROLE {app_role} LOGIN PASSWORD {quote_literal(app_pw)}")
            for statement in (
                f"GRANT CREATE ON DATABASE postgres TO {admin_role}",
                f"ALTER SCHEMA public OWNER TO {quote_ident(admin_role)}",
            ):
                conn.exec_driver_sql(f"SELECT run_command_on_all_nodes({quote_literal(statement)})")
        engine.dispose()
        cluster.authorize(admin_role, admin_pw)
        cluster.authorize(app_role, app_pw)
        url = cluster.superuser_url
        tenancy = Tenancy(
            url.set(username=app_role, password=app_pw),
            admin_url=url.set(username=admin_role, password=admin_pw),
            metadata=Base.metadata,
            infrastructure_schemas=["billing"],
            distributed=True,
            registry_listen=False,
            secret_key=secrets.token_urlsafe(24),
        )
        tenancy.install()
        slugs = [f"t{i}" for i in range(8)]
        Sessions = tenancy.sessionmaker()
        for slug in slugs:
            tenancy.create_tenant(slug)
            with tenant_context(slug), Sessions() as session:
                session.add_all(Project(name=f"{slug}-{n}") for n in range(50))
                session.commit()
        acme = tenancy.get_tenant("t0")
        with tenant_context("t0"), Sessions() as session:
            pk = session.scalars(select(Project.id).limit(1)).one()
        plain = create_engine(url.set(username=admin_role, password=admin_pw))  # BYPASSRLS: no binding
        schema_tenant = tenancy.create_tenant("s0", placement="schema")
        for login in tenancy.node_logins(schema_tenant):
            cluster.authorize(*login)
        role, password = tenancy.node_logins(schema_tenant)[0]
        with tenant_context("s0"), Sessions() as session:
            session.add_all(Project(name=f"s0-{n}") for n in range(50))
            session.commit()
            schema_pk = session.scalars(select(Project.id).limit(1)).one()
        schema_plain = create_engine(
            url.set(username=role, password=password),
            connect_args={
                "options": f"-c search_path={schema_tenant.location['schema']} "
                f"-c app.current_tenant_id={schema_tenant.id} -c citus.propagate_set_commands=local"
            },
        )

        def tenant_session() -> None:
            with tenant_context("t0"), Sessions() as session:
                session.get(Project, (acme.id, pk))

        def plain_session() -> None:
            with Session(plain) as session:
                session.get(Project, (acme.id, pk))

        def schema_tenant_session() -> None:
            with tenant_context("s0"), Sessions() as session:
                session.get(Project, (schema_tenant.id, schema_pk))

        def schema_plain_session() -> None:
            with Session(schema_plain) as session:
                session.get(Project, (schema_tenant.id, schema_pk))

        def cross_tenant() -> None:
            with platform_context("benchmark"), Sessions() as session:
                session.scalar(select(func.count()).select_from(Project))

        arms = {
            "TenantSession (one tenant, routed)": tenant_session,
            "plain Session, same query": plain_session,
            "cross-tenant count (platform)": cross_tenant,
            "schema tenant: TenantSession": schema_tenant_session,
            "schema tenant: plain Session as its role": schema_plain_session,
        }
        times: dict[str, list[float]] = {name: [] for name in arms}
        for i in range(rounds):
            order = list(arms) if i % 2 == 0 else list(reversed(arms))
            for name in order:
                started = time.perf_counter()
                for _ in range(per_round):
                    arms[name]()
                times[name].append((time.perf_counter() - started) / per_round)
        base = statistics.median(times["plain Session, same query"])
        print(
            f"Citus coordinator + 2 workers, 8 tenants x 50 rows; {rounds} rounds x {per_round} tx; medians:"
        )
        schema_base = statistics.median(times["schema tenant: plain Session as its role"])
        for name, samples in times.items():
            median = statistics.median(samples)
            against = schema_base if name.startswith("schema") else base
            print(f"  {name:42} {median * 1e6:8.0f} us/tx   {median / against:5.2f}x its plain Session")
        tenancy.dispose()
        plain.dispose()
        schema_plain.dispose()


if __name__ == "__main__":
    main()
