"""Privileges: what the application role, the tenants' group role and the anonymous roles hold in
the main database, made by :meth:`Tenancy.install`, by provisioning and by the migration runner
alike (one definition, so that each grants the same)."""

from __future__ import annotations

from sqlalchemy import Connection, Table, text

from .anonymous import main_database_ddl
from .binding import ADMIT_FUNCTION
from .config import TenancyConfig
from .identifiers import quote_ident, quote_literal
from .registry import ACCESS_KEY_FUNCTION, APPLICATION_COLUMNS, REGISTRY_SCHEMA
from .rls import is_tenant_scoped, qualified_name

__all__ = [
    "fill_serial_ddl",
    "finish_tables",
    "grant_statements",
    "registry_grants",
    "tenants_group",
    "tenants_group_grants",
]


def registry_grants(role: str) -> list[str]:
    """What ``role`` (the application role) may do with the registry: read every column of
    ``config.tenants`` but the access key hash, verify access keys, call the policy function.
    Idempotent, and takes back the table-wide ``SELECT`` that earlier versions granted."""
    r = quote_ident(role)
    columns = ", ".join(quote_ident(c) for c in APPLICATION_COLUMNS)
    return [
        f"GRANT USAGE ON SCHEMA {REGISTRY_SCHEMA} TO {r}",
        # revoking the table-wide privilege revokes the column privileges too: grant them afresh
        f"REVOKE SELECT ON {REGISTRY_SCHEMA}.tenants FROM {r}",
        f"GRANT SELECT ({columns}) ON {REGISTRY_SCHEMA}.tenants TO {r}",
        f"GRANT EXECUTE ON FUNCTION {REGISTRY_SCHEMA}.current_tenant_id() TO {r}",
        f"GRANT EXECUTE ON FUNCTION {ACCESS_KEY_FUNCTION}(uuid) TO {r}",
        f"GRANT EXECUTE ON FUNCTION {ADMIT_FUNCTION}(uuid) TO {r}",
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
    fill infrastructure serial keys for foreign-table inserts."""
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
