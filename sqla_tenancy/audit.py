"""The audit trail of cross-tenant writes, kept by PostgreSQL itself.

:func:`install_audit` creates ``tenancy.audit_log`` in the main database and, on every table
there that tenants' rows live in (the shared tenant tables, the infrastructure tables, each
schema tenant's tables), three statement-level ``AFTER`` triggers with transition tables. Each
write statement that a *platform* session makes adds one row per tenant it wrote: the tenant
(read from the written rows' ``tenant_id``; NULL for a table without one), the table, the
operation, the row count, the session's and the current role, the reason, ``application_name``,
the time and the transaction id. Because the triggers are in the database, raw SQL
(``session.execute(text(...))``, ``psql`` as the admin role) is recorded too.

A write is a platform write when its session carries a reason (``app.platform_reason``, which
:func:`~sqla_tenancy.platform_context` sends with each transaction of a plain engine, the admin
engine included) or when its role bypasses row-level security (a superuser or BYPASSRLS role
writing without a reason is recorded with a NULL reason: exactly what deserves a look).
Tenants' own writes are not recorded, unless ``tenant_writes=True``.

Cost: a statement that writes nothing audited pays the trigger's call and one catalog look-up
(the role's attributes); an audited one an ``INSERT ... SELECT ... GROUP BY tenant_id`` over its
transition table. Transition tables are kept for every write to the table, audited or not (the
triggers exist): ``docs/operations.md`` gives measured figures.

Database tenants' own tables live in their databases, which platform sessions do not write to;
their writes to infrastructure tables reach the main database through postgres_fdw and are
recorded there (as tenant writes).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text

from .context import current_platform_reason
from .dialect import TenancyDialect
from .grants import tenants_group
from .identifiers import quote_ident, quote_literal
from .placements.base import run_script
from .registry import REGISTRY_SCHEMA, Tenant
from .rls import qualified_name, tenant_column_name

if TYPE_CHECKING:
    from .engines import Engines
    from .services import Services

__all__ = [
    "AUDIT_TABLE",
    "REASON_SETTING",
    "AuditEntry",
    "attach_platform_reason",
    "send_platform_reason",
    "audit_grants",
    "audit_log",
    "audit_table_ddl",
    "install_audit",
    "is_installed",
    "trigger_ddl",
]

#: Where the trail is kept (main database).
AUDIT_TABLE = f"{REGISTRY_SCHEMA}.audit_log"
#: The transaction-local setting that carries a platform context's reason to the triggers.
REASON_SETTING = "app.platform_reason"
_FUNCTION = f"{REGISTRY_SCHEMA}.audit_write"
_STAMP = f"{REGISTRY_SCHEMA}.audit_stamp"
_OPERATIONS = {"INSERT": "new_rows", "UPDATE": "new_rows", "DELETE": "old_rows"}


@dataclass(frozen=True)
class AuditEntry:
    """One audited statement's writes to one tenant's rows of one table."""

    id: int
    at: datetime
    transaction_id: int
    tenant_id: uuid.UUID | None
    #: the tenant's slug, when the registry still has it
    tenant: str | None
    table: str
    operation: str
    rows: int
    #: the session's login role (``session_user``)
    actor: str
    #: the role the statement ran as (``current_user``)
    role: str
    reason: str | None
    application: str | None


def audit_table_ddl(*, tenant_writes: bool) -> list[str]:
    """The audit table, its indexes, the trigger that stamps each entry with its writer, and
    the trigger function the audited tables call."""
    audit_all = "true" if tenant_writes else "false"
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            transaction_id bigint NOT NULL DEFAULT txid_current(),
            tenant_id uuid,
            table_name text NOT NULL,
            operation text NOT NULL,
            row_count bigint NOT NULL,
            actor text NOT NULL DEFAULT session_user,
            role text NOT NULL DEFAULT current_user,
            reason text,
            application text
        )
        """,
        f"CREATE INDEX IF NOT EXISTS audit_log_tenant_at ON {AUDIT_TABLE} (tenant_id, at)",
        f"CREATE INDEX IF NOT EXISTS audit_log_at ON {AUDIT_TABLE} (at)",
        f"REVOKE ALL ON {AUDIT_TABLE} FROM PUBLIC",
        # Who wrote is the database's word, not the inserting statement's: the identity, the
        # time and the transaction are set here, whatever an INSERT says.
        f"""
        CREATE OR REPLACE FUNCTION {_STAMP}() RETURNS trigger
        LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            NEW.at := now();
            NEW.transaction_id := txid_current();
            NEW.actor := session_user;
            NEW.role := current_user;
            NEW.application := nullif(current_setting('application_name'), '');
            RETURN NEW;
        END $$
        """,
        f"DROP TRIGGER IF EXISTS audit_log_stamp ON {AUDIT_TABLE}",
        f"CREATE TRIGGER audit_log_stamp BEFORE INSERT ON {AUDIT_TABLE} "
        f"FOR EACH ROW EXECUTE FUNCTION {_STAMP}()",
        # The trigger function runs as the writing role (SECURITY INVOKER: current_user is who
        # wrote, which a SECURITY DEFINER function could not tell).
        f"""
        CREATE OR REPLACE FUNCTION {_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
        DECLARE
            reason text := nullif(current_setting('{REASON_SETTING}', true), '');
            rows_name text := CASE TG_OP WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END;
        BEGIN
            IF reason IS NULL AND NOT {audit_all} AND NOT EXISTS (
                SELECT FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolbypassrls)
            ) THEN
                RETURN NULL;
            END IF;
            EXECUTE format(
                'INSERT INTO {AUDIT_TABLE} (tenant_id, table_name, operation, row_count, reason) '
                'SELECT %s, %L, %L, count(*), %L FROM %I GROUP BY 1',
                CASE WHEN TG_ARGV[0] = '' THEN 'NULL::uuid' ELSE quote_ident(TG_ARGV[0]) END,
                TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP, reason, rows_name
            );
            RETURN NULL;
        END $$
        """,
    ]


def audit_grants(writers: list[str]) -> list[str]:
    """``INSERT`` (only) on the trail for the roles that write audited tables: the application
    role and the tenants' group (schema tenants' roles, FDW roles, run_sql sandboxes). They can
    add an entry by hand, never read, change or delete one, nor hide who they are."""
    return [f"GRANT INSERT ON {AUDIT_TABLE} TO {quote_ident(role)}" for role in writers]


def trigger_ddl(target: str, tenant_column: str | None) -> list[str]:
    """The three statement-level triggers that audit ``target`` (a qualified table name)."""
    statements = []
    for operation, rows in _OPERATIONS.items():
        name = quote_ident(f"tenancy_audit_{operation.lower()}")
        transition = "OLD" if operation == "DELETE" else "NEW"
        statements += [
            f"DROP TRIGGER IF EXISTS {name} ON {target}",
            f"CREATE TRIGGER {name} AFTER {operation} ON {target} REFERENCING {transition} TABLE AS "
            f"{rows} FOR EACH STATEMENT EXECUTE FUNCTION {_FUNCTION}({quote_literal(tenant_column or '')})",
        ]
    return statements


def is_installed(conn: Connection) -> bool:
    """Whether the main database keeps an audit trail."""
    return conn.execute(text("select to_regclass(:t)"), {"t": AUDIT_TABLE}).scalar() is not None


def _audited_tables(services: Services, conn: Connection) -> list[tuple[str, str | None]]:
    """``(qualified name, tenant column)`` of every main-database table to audit that exists."""
    config = services.config
    tables = [*config.tenant_tables(), *config.infrastructure_tables()]
    targets = [(qualified_name(t), tenant_column_name(t)) for t in tables]
    schemas = conn.execute(
        text(f"select location ->> 'schema' from {REGISTRY_SCHEMA}.tenants where strategy = 'schema'")
    ).scalars()
    for schema in sorted(s for s in schemas if s):
        for table in config.tenant_tables():
            if table.schema is None:
                targets.append(
                    (f"{quote_ident(schema)}.{quote_ident(table.name)}", tenant_column_name(table))
                )
    return [
        (name, column)
        for name, column in targets
        if conn.execute(text("select to_regclass(:t)"), {"t": name}).scalar() is not None
    ]


def install_audit(services: Services, *, tenant_writes: bool = False) -> None:
    """Create the trail and its triggers (idempotent; one transaction)."""
    with services.engines.admin.begin() as conn:
        run_script(conn, ";\n".join(audit_table_ddl(tenant_writes=tenant_writes)))
        config = services.config
        writers = [tenants_group(config), *([config.app_role] if config.app_role else [])]
        run_script(conn, ";\n".join(audit_grants(writers)))
        statements: list[str] = []
        for target, column in _audited_tables(services, conn):
            statements += trigger_ddl(target, column)
        if statements:
            run_script(conn, ";\n".join(statements))


def audit_new_schema_tenant(services: Services, tenant: Tenant) -> None:
    """Give a new schema tenant's tables their audit triggers, when the trail is installed."""
    schema = tenant.location.get("schema")
    if tenant.strategy != "schema" or not schema:
        return
    with services.engines.admin.begin() as conn:
        if not is_installed(conn):
            return
        statements: list[str] = []
        for table in services.config.tenant_tables():
            if table.schema is None:
                target = f"{quote_ident(str(schema))}.{quote_ident(table.name)}"
                statements += trigger_ddl(target, tenant_column_name(table))
        if statements:
            run_script(conn, ";\n".join(statements))


def audit_log(
    services: Services, *, tenant: Tenant | None, since: datetime | None, limit: int | None
) -> list[AuditEntry]:
    """The trail, newest first (``tenant``: only its rows; ``since``: only entries from then)."""
    clauses, params = [], dict[str, Any]()
    if tenant is not None:
        clauses.append("a.tenant_id = :tenant")
        params["tenant"] = tenant.id
    if since is not None:
        clauses.append("a.at >= :since")
        params["since"] = since
    where = f"where {' and '.join(clauses)}" if clauses else ""
    bound = ""
    if limit is not None:
        bound = "limit :limit"
        params["limit"] = int(limit)
    query = text(
        "select a.id, a.at, a.transaction_id, a.tenant_id, t.slug, a.table_name, a.operation, "
        f"a.row_count, a.actor, a.role, a.reason, a.application from {AUDIT_TABLE} a "
        f"left join {REGISTRY_SCHEMA}.tenants t on t.id = a.tenant_id {where} "
        f"order by a.at desc, a.id desc {bound}"
    )
    with services.engines.admin.connect() as conn:
        if not is_installed(conn):
            return []
        return [AuditEntry(*row) for row in conn.execute(query, params).all()]


# -- carrying the reason ----------------------------------------------------------------------

_SET_REASON = f"select set_config('{REASON_SETTING}', %s, true)"


def send_platform_reason(conn: Any) -> None:
    """The ``begin`` listener of the admin engines (see :func:`attach_platform_reason`)."""
    reason = current_platform_reason()
    if reason is None or isinstance(conn.dialect, TenancyDialect) or conn.dialect.name != "postgresql":
        return  # tenant engines bind their transactions themselves; other databases know no set_config
    dbapi = conn.connection.dbapi_connection
    if dbapi is None:
        return
    # The first statement of the transaction (psycopg opens it implicitly), so that every
    # write the platform context makes in it carries the reason.
    cursor = dbapi.cursor()
    try:
        cursor.execute(_SET_REASON, (reason,))
    finally:
        cursor.close()


def attach_platform_reason(engines: Engines) -> None:
    """Make every transaction begun inside :func:`~sqla_tenancy.platform_context` on the
    Tenancy's admin engines (sync and async: the ones platform work runs on) carry the context's
    reason as ``app.platform_reason`` (transaction-local). Only those engines get the listener:
    any ``begin`` listener sends SQLAlchemy down slower paths, so the application's tenant engines
    (and any other engine of the process) have none. Call it before the admin engines are made."""
    engines.admin_begin = send_platform_reason
