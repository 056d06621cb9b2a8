"""Privileges: what the application role, the tenants' group role and the anonymous roles hold in
the main database, made by :meth:`Tenancy.install`, by provisioning and by the migration runner
alike (one definition, so that each grants the same)."""

from __future__ import annotations

import re

from sqlalchemy import Connection, Table, text

from . import locks
from .anonymous import anonymous_group, main_database_ddl
from .binding import ADMIT_FUNCTION, ADMIT_PROCEDURE
from .config import TenancyConfig
from .identifiers import quote_ident, quote_literal
from .registry import ACCESS_KEY_FUNCTION, APPLICATION_COLUMNS, REGISTRY_SCHEMA
from .rls import is_tenant_scoped, qualified_name

__all__ = [
    "KEEPERS_PER_CONNECTION",
    "KEEPER_TENANTS",
    "calling_keeper",
    "fill_serial_ddl",
    "finish_tables",
    "grant_statements",
    "is_keeper_role",
    "keeper_call",
    "keeper_for_new_roles",
    "keeper_drops",
    "keeper_of",
    "keeper_role",
    "keeper_upgrades",
    "keepers_apply",
    "registry_grants",
    "tenants_group",
    "tenants_group_grants",
]


def registry_grants(role: str) -> list[str]:
    """What ``role`` (the application role) may do with the registry: read every column of
    ``tenancy.tenants`` but the access key hash (and the system column ``xmax``, which the
    admission reads), verify access keys, call the policy function.
    Idempotent, and takes back the table-wide ``SELECT`` that earlier versions granted."""
    r = quote_ident(role)
    columns = ", ".join(quote_ident(c) for c in (*APPLICATION_COLUMNS, "xmax"))
    return [
        f"GRANT USAGE ON SCHEMA {REGISTRY_SCHEMA} TO {r}",
        # revoking the table-wide privilege revokes the column privileges too: grant them afresh
        f"REVOKE SELECT ON {REGISTRY_SCHEMA}.tenants FROM {r}",
        f"GRANT SELECT ({columns}) ON {REGISTRY_SCHEMA}.tenants TO {r}",
        f"GRANT EXECUTE ON FUNCTION {REGISTRY_SCHEMA}.current_tenant_id() TO {r}",
        f"GRANT EXECUTE ON FUNCTION {ACCESS_KEY_FUNCTION}(uuid) TO {r}",
        f"GRANT EXECUTE ON FUNCTION {ADMIT_FUNCTION}(uuid) TO {r}",
        f"GRANT EXECUTE ON FUNCTION {ADMIT_FUNCTION}(uuid, text) TO {r}",
        f"GRANT EXECUTE ON PROCEDURE {ADMIT_PROCEDURE}(uuid, text) TO {r}",
    ]


def fill_serial_ddl(conn: Connection, table: Table) -> list[str]:
    """Triggers giving an infrastructure table's serial columns their value when a foreign table
    (a database tenant's) inserts NULL there: foreign tables do not apply remote defaults."""
    statements = []
    target = qualified_name(table)
    for column in table.primary_key.columns:
        sequence = conn.execute(
            text("select pg_get_serial_sequence(:t, :c)"), {"t": target, "c": column.name}
        ).scalar()
        if sequence is None:
            continue
        trigger = quote_ident(f"tenancy_fill_{column.name}")
        statements += [
            f"DROP TRIGGER IF EXISTS {trigger} ON {target}",
            f"CREATE TRIGGER {trigger} BEFORE INSERT ON {target} FOR EACH ROW EXECUTE FUNCTION "
            f"{REGISTRY_SCHEMA}.fill_serial({quote_literal(column.name)}, {quote_literal(sequence)})",
        ]
    return statements


def grant_statements(config: TenancyConfig, role: str, tables: list[Table] | None = None) -> list[str]:
    """What the application role needs in the main database (on ``tables``, by default every table
    of the metadata), and nothing more."""
    r = quote_ident(role)
    statements = registry_grants(role)
    schemas = {t.schema for t in config.metadata.tables.values() if t.schema}
    for schema in sorted(schemas):
        statements.append(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {r}")
    for table in config.metadata.sorted_tables if tables is None else tables:
        statements.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {qualified_name(table)} TO {r}")
    return statements


def tenants_group(config: TenancyConfig) -> str:
    """The NOLOGIN group role holding what every per-tenant role (a schema tenant's role, a
    database tenant's FDW role) may do with the infrastructure. Members inherit it; new tables get
    it through default privileges, so tenants created earlier are not left without access."""
    return f"{config.name_prefix}_tenants"


def tenants_group_grants(config: TenancyConfig, tables: list[Table] | None = None) -> list[str]:
    """Idempotent: read every infrastructure table, write the tenant-scoped ones (RLS confines the
    writes to the member's own tenant); global tables stay read-only for tenants."""
    group = tenants_group(config)
    g, literal = quote_ident(group), quote_literal(group)
    statements = [
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {literal}) THEN "
        f"CREATE ROLE {g} NOLOGIN; END IF; END $$",
        f"GRANT CONNECT ON DATABASE {quote_ident(config.admin_url.database or '')} TO {g}",
        f"GRANT USAGE ON SCHEMA {REGISTRY_SCHEMA} TO {g}",
    ]
    for schema in sorted(config.infrastructure_schemas):
        s = quote_ident(schema)
        statements += [
            f"GRANT USAGE ON SCHEMA {s} TO {g}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {g}",
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {g}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT ON TABLES TO {g}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE, SELECT ON SEQUENCES TO {g}",
        ]
    infrastructure = config.infrastructure_tables()
    for table in infrastructure if tables is None else [t for t in tables if t in infrastructure]:
        if is_tenant_scoped(table):
            statements.append(f"GRANT INSERT, UPDATE, DELETE ON {qualified_name(table)} TO {g}")
    return statements


def finish_tables(config: TenancyConfig, conn: Connection, tables: list[Table]) -> None:
    """Idempotently give the main database's ``tables`` (those that exist) what they need besides
    their DDL: the application role's grants, the tenants' group grants, and the triggers that
    fill infrastructure serial keys for foreign-table inserts. Takes :data:`~sqla_tenancy.locks.GRANTS_KEY`
    for the rest of ``conn``'s transaction."""
    conn.execute(text(locks.XACT_LOCK), {"key": locks.GRANTS_KEY})
    existing = [
        t for t in tables if conn.execute(text("select to_regclass(:t)"), {"t": qualified_name(t)}).scalar()
    ]
    for table in existing:
        # (on Citus, no database tenants write through postgres_fdw, and Citus refuses triggers
        # on reference tables)
        if table.schema in config.infrastructure_schemas and not config.distributed:
            for statement in fill_serial_ddl(conn, table):
                conn.exec_driver_sql(statement)
    for statement in tenants_group_grants(config, existing):
        conn.exec_driver_sql(statement)
    app_role = config.url.username
    if app_role and app_role != config.admin_url.username:
        for statement in grant_statements(config, app_role, existing):
            conn.exec_driver_sql(statement)
        # Sequences behind serial/identity columns.
        for schema in sorted({t.schema or "public" for t in existing}):
            conn.exec_driver_sql(
                f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {quote_ident(schema)} "
                f"TO {quote_ident(app_role)}"
            )
    # the anonymous requests' roles: SELECT on the opted-in tables only (sqla_tenancy.anonymous)
    for statement in main_database_ddl(config, existing, app_role):
        conn.exec_driver_sql(statement)


# -- role keepers ---------------------------------------------------------------------------------
#
# On PostgreSQL 16+, a CREATEROLE role that creates a role is made a member of it (WITH ADMIN
# OPTION), and every GRANT of a role membership walks the whole membership graph above the granting
# role (is_admin_of_role(), select_best_admin(): uncached, one catalog look-up per role reached). If
# the admin role created every tenant's roles, each GRANT would cost one look-up per role in the
# fleet: provisioning a schema tenant would slow down linearly as the fleet grows. Instead, the
# schema tenants' roles are created and granted by *keepers*: NOLOGIN CREATEROLE roles, each of
# which creates the roles of at most KEEPER_TENANTS tenants, through a SECURITY DEFINER function it
# owns (so that no SET ROLE, itself a walk of the admin's memberships, is needed). The walks then
# stay within one keeper's roles, whatever the size of the fleet. Only the admin role may call a
# keeper's function, and a keeper holds nothing but what it needs: ADMIN OPTION on the tenants'
# group and the anonymous roles' group (without their privileges) and on the roles it created.

#: Schema tenants whose roles one keeper creates (two roles each).
KEEPER_TENANTS = 32
#: Keepers whose functions one admin connection may call before it is replaced (see
#: :func:`calling_keeper`).
KEEPERS_PER_CONNECTION = 8
#: ``Connection.info`` key: the keepers whose functions the connection's server session called.
_KEEPERS_CALLED = "sqla_tenancy_keepers_called"
#: PostgreSQL's bootstrap superuser, the recorded grantor of a creator's implicit ADMIN membership.
_BOOTSTRAP_SUPERUSER = 10
#: The action keepers' functions of earlier versions lack (:func:`keeper_upgrades` adds it).
_DROP = "'drop'"


def keeper_role(config: TenancyConfig, number: int) -> str:
    """The ``number``-th keeper role (its function in the registry schema has the same name)."""
    return f"{config.name_prefix}_keeper_{number:05d}"


def is_keeper_role(config: TenancyConfig, name: str) -> bool:
    """Whether ``name`` is one of this Tenancy's keeper roles."""
    return re.fullmatch(rf"{re.escape(config.name_prefix)}_keeper_[0-9]{{5}}", name) is not None


def keepers_apply(conn: Connection) -> bool:
    """Whether tenant roles go through keepers on ``conn``'s server (PostgreSQL 16+: older servers
    let a CREATEROLE role grant any role without walking the membership graph)."""
    return (conn.dialect.server_version_info or (0,)) >= (16,)


def calling_keeper(conn: Connection, keeper: str) -> None:
    """Record that ``conn``'s server session is about to call ``keeper``'s function; once it has
    called more than :data:`KEEPERS_PER_CONNECTION` keepers' functions, the pool replaces the
    connection at its next checkout (a soft invalidation: the transaction in progress goes on).

    Each PL/pgSQL function a server session calls leaves its plans in that session's plan cache
    for the session's life, and PostgreSQL visits every cached plan at each relation
    invalidation, which a schema tenant's DDL sends by the hundred. An admin connection that
    created a fleet would otherwise hold the plans of every keeper (one per 32 tenants) and make
    each later tenant dearer: at 5,000 tenants a creation took 1.25x its pair on a small fleet,
    1.08x with the connections replaced (``benchmarks/bench_schema.py --reference``)."""
    called: set[str] = conn.info.setdefault(_KEEPERS_CALLED, set())
    called.add(keeper)
    if len(called) > KEEPERS_PER_CONNECTION:
        conn.connection.invalidate(soft=True)


def keeper_call(keeper: str, action: str, role: str, other: str = "") -> str:
    """The statement asking ``keeper`` to ``create`` the NOLOGIN tenant role ``role`` as a member of
    the group ``other``, to ``grant`` (``grant_inherit``) ``role`` to ``other`` WITH INHERIT
    FALSE (TRUE), or to ``drop`` ``role``, one it created (:func:`keeper_drops`)."""
    if action not in ("create", "grant", "grant_inherit", "drop"):
        raise ValueError(f"unknown keeper action {action!r}")
    return (
        f"SELECT {REGISTRY_SCHEMA}.{quote_ident(keeper)}"
        f"({quote_literal(action)}, {quote_literal(role)}, {quote_literal(other)})"
    )


def _keeper_function(config: TenancyConfig, keeper: str) -> str:
    function = f"{REGISTRY_SCHEMA}.{quote_ident(keeper)}"
    options = "NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE INHERIT"
    return f"""
        CREATE OR REPLACE FUNCTION {function}(action text, role text, other text) RETURNS void
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            IF action = 'create' THEN
                EXECUTE format('CREATE ROLE %I {options} IN ROLE %I', role, other);
            ELSIF action = 'grant' THEN
                EXECUTE format('GRANT %I TO %I WITH INHERIT FALSE', role, other);
            ELSIF action = 'grant_inherit' THEN
                EXECUTE format('GRANT %I TO %I WITH INHERIT TRUE', role, other);
            ELSIF action = {_DROP} THEN
                -- only a role this keeper created (not the groups it holds ADMIN OPTION on)
                IF NOT EXISTS (
                    SELECT FROM pg_auth_members a
                    WHERE a.roleid = (SELECT oid FROM pg_roles WHERE rolname = role)
                      AND a.member = (SELECT oid FROM pg_roles WHERE rolname = current_user)
                      AND a.admin_option AND a.grantor = {_BOOTSTRAP_SUPERUSER}
                ) THEN
                    RAISE EXCEPTION 'role % was not created by %', role, current_user;
                END IF;
                EXECUTE format('DROP ROLE %I', role);
            ELSE
                RAISE EXCEPTION 'unknown action %', action;
            END IF;
        END $$"""


def _keeper_ddl(config: TenancyConfig, keeper: str) -> list[str]:
    """A new keeper: the role, ADMIN OPTION on the two groups, and its function, callable by the
    admin role only."""
    k = quote_ident(keeper)
    options = "ADMIN TRUE, INHERIT FALSE, SET FALSE"
    return [
        f"CREATE ROLE {k} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB CREATEROLE NOINHERIT",
        f"GRANT {quote_ident(tenants_group(config))} TO {k} WITH {options}",
        f"GRANT {quote_ident(anonymous_group(config))} TO {k} WITH {options}",
        *_keeper_function_ddl(config, keeper),
    ]


def _keeper_function_ddl(config: TenancyConfig, keeper: str) -> list[str]:
    """``keeper``'s function, made (or replaced) as the keeper, which owns it; the admin role may
    SET ROLE to the keeper, and the keeper create in the registry schema, only meanwhile. The
    grant on the schema rewrites its catalog row: run under :data:`~sqla_tenancy.locks.GRANTS_KEY`."""
    k, admin = quote_ident(keeper), quote_ident(config.admin_url.username or "")
    function = f"{REGISTRY_SCHEMA}.{quote_ident(keeper)}(text, text, text)"
    return [
        f"GRANT {k} TO {admin} WITH INHERIT FALSE, SET TRUE",
        f"GRANT USAGE, CREATE ON SCHEMA {REGISTRY_SCHEMA} TO {k}",
        f"SET LOCAL ROLE {k}",
        _keeper_function(config, keeper),
        f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC",
        f"GRANT EXECUTE ON FUNCTION {function} TO {admin}",
        "SET LOCAL ROLE NONE",
        f"REVOKE USAGE, CREATE ON SCHEMA {REGISTRY_SCHEMA} FROM {k}",
        f"REVOKE {k} FROM {admin}",
    ]


def _keepers_without_drop(conn: Connection, config: TenancyConfig) -> list[str]:
    """The keepers whose function (made by an earlier version) cannot drop the roles it created."""
    rows = conn.execute(
        text(
            "select p.proname from pg_proc p where p.pronamespace = CAST(:schema AS regnamespace) "
            "and p.proname >= :lo and p.proname <= :hi and strpos(p.prosrc, :drop) = 0 order by 1"
        ),
        {
            "schema": REGISTRY_SCHEMA,
            "lo": keeper_role(config, 0),
            "hi": keeper_role(config, 99999),
            "drop": _DROP,
        },
    ).scalars()
    return [str(name) for name in rows if is_keeper_role(config, str(name))]


def keeper_upgrades(conn: Connection, config: TenancyConfig) -> list[str]:
    """The scripts giving the keepers made by earlier versions this version's function (with
    ``drop``), one per keeper, to run under :data:`~sqla_tenancy.locks.GRANTS_KEY` in ``conn``'s
    transaction (with ``run_script``: the function's body is not parameter-free SQL for the
    driver); none when there is nothing to upgrade. Each costs one walk of the admin role's
    memberships (the ``GRANT`` letting it act as the keeper), once."""
    if not keepers_apply(conn) or config.distributed:
        return []
    return [";\n".join(_keeper_function_ddl(config, k)) for k in _keepers_without_drop(conn, config)]


def keeper_drops(conn: Connection, config: TenancyConfig, role: str) -> str | None:
    """The keeper that created ``role`` when its function can drop it (then ``keeper_call(keeper,
    "drop", role)`` drops it without walking the admin role's memberships); ``None`` otherwise
    (PostgreSQL 15, Citus, a role the admin created, a keeper not upgraded yet)."""
    if not keepers_apply(conn) or config.distributed:
        return None
    keeper = keeper_of(conn, config, role)
    if keeper is None:
        return None
    drops = conn.execute(
        text("select strpos(prosrc, :drop) > 0 from pg_proc where oid = to_regprocedure(:f)"),
        {"drop": _DROP, "f": f"{REGISTRY_SCHEMA}.{quote_ident(keeper)}(text, text, text)"},
    ).scalar()
    return keeper if drops else None


def _last_keeper(conn: Connection, config: TenancyConfig) -> tuple[str, int] | None:
    """The newest keeper and how many roles it is a member of (its two groups and the roles it
    created): an index range on ``pg_authid``'s name, then one on ``pg_auth_members``'s member."""
    row = conn.execute(
        text(
            "select r.rolname, (select count(*) from pg_auth_members m where m.member = r.oid) "
            "from pg_roles r where r.rolname >= :lo and r.rolname <= :hi "
            "order by r.rolname desc limit 1"
        ),
        {"lo": keeper_role(config, 0), "hi": keeper_role(config, 99999)},
    ).first()
    return (str(row[0]), int(row[1])) if row is not None else None


def keeper_for_new_roles(conn: Connection, config: TenancyConfig) -> tuple[str, list[str]]:
    """The keeper that creates the next schema tenant's roles, and the DDL to run first (a new
    keeper's, when the newest one is full), inside ``conn``'s transaction."""
    last = _last_keeper(conn, config)
    if last is not None and last[1] < 2 + 2 * KEEPER_TENANTS:
        return last[0], []
    # Two provisionings that both find the newest keeper full make one new keeper, not two.
    conn.execute(text(locks.XACT_LOCK), {"key": locks.keeper_key(config.name_prefix)})
    last = _last_keeper(conn, config)
    if last is not None and last[1] < 2 + 2 * KEEPER_TENANTS:
        return last[0], []
    # A new keeper is granted, then refused, CREATE on the tenancy schema: that schema's catalog
    # row is one the tenants' group grants rewrite too (locks.GRANTS_KEY).
    conn.execute(text(locks.XACT_LOCK), {"key": locks.GRANTS_KEY})
    number = int(last[0].rsplit("_", 1)[1]) + 1 if last is not None else 1
    if number > 99999:
        raise RuntimeError("no keeper role number left")  # 3.2 million schema tenants
    keeper = keeper_role(config, number)
    return keeper, _keeper_ddl(config, keeper)


def keeper_of(conn: Connection, config: TenancyConfig, role: str) -> str | None:
    """The keeper that created ``role`` (None: the admin role did, as before keepers existed)."""
    rows = conn.execute(
        text(
            "select m.rolname from pg_auth_members a join pg_roles m on m.oid = a.member "
            "where a.roleid = (select oid from pg_roles where rolname = :r) and a.admin_option "
            "and a.grantor = :bootstrap"
        ),
        {"r": role, "bootstrap": _BOOTSTRAP_SUPERUSER},
    ).scalars()
    keepers = [str(name) for name in rows if is_keeper_role(config, str(name))]
    return keepers[0] if keepers else None
