"""``Tenancy.install()``: the quick-start path that creates everything the main database needs.

Idempotent and serialised by an advisory lock, so two processes starting together do not race.
The Alembic extension is the production path; both build their DDL from :mod:`sqla_tenancy.rls`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Table, text

from .anonymous import main_database_ddl
from .identifiers import quote_ident, quote_literal
from .keys import check_tenant_keys
from .locks import INSTALL_KEY
from .registry import (
    ACCESS_KEY_FUNCTION,
    APPLICATION_COLUMNS,
    NOTIFY_CHANNEL,
    REGISTRY_SCHEMA,
    SLUG_CHECK,
    access_key_hash_sql,
    registry_metadata,
)
from .rls import current_tenant_function_ddl, enable_rls_ddl, is_tenant_scoped, qualified_name

if TYPE_CHECKING:
    from .tenancy import Tenancy

__all__ = [
    "access_key_function_ddl",
    "ensure_registry",
    "finish_tables",
    "grant_statements",
    "install",
    "registry_ddl",
    "registry_grants",
    "restrict_database",
    "tenants_group",
    "tenants_group_grants",
]

log = logging.getLogger(__name__)


def registry_ddl() -> list[str]:
    """The function and trigger that make every registry change a notification."""
    return [
        f"""
        CREATE OR REPLACE FUNCTION {REGISTRY_SCHEMA}.notify_tenant_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            -- The migration runner's copy of a tenant's revision is not routing state: no
            -- notification (NOTIFY serialises committing transactions, and a fleet run updates
            -- every row).
            IF TG_OP = 'UPDATE' AND to_jsonb(NEW) - 'revision' = to_jsonb(OLD) - 'revision' THEN
                RETURN NULL;
            END IF;
            PERFORM pg_notify('{NOTIFY_CHANNEL}', coalesce(NEW.id, OLD.id)::text);
            RETURN NULL;
        END $$
        """,
        f"DROP TRIGGER IF EXISTS tenants_notify ON {REGISTRY_SCHEMA}.tenants",
        f"""
        CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE
        ON {REGISTRY_SCHEMA}.tenants FOR EACH ROW
        EXECUTE FUNCTION {REGISTRY_SCHEMA}.notify_tenant_change()
        """,
    ]


def access_key_function_ddl() -> list[str]:
    """``tenancy.access_key_tenant(key uuid) -> uuid``: the id of the tenant whose access key is
    ``key``, or NULL. It runs as its owner (``SECURITY DEFINER``, the admin role that ran
    :func:`ensure_registry`) with a pinned ``search_path``, so that a role allowed to execute it
    (the application role) verifies keys without any right to read their hashes. Nobody else may
    execute it (``PUBLIC`` may, by default, execute any new function)."""
    function = f"{ACCESS_KEY_FUNCTION}(uuid)"
    return [
        f"""
        CREATE OR REPLACE FUNCTION {ACCESS_KEY_FUNCTION}(presented uuid) RETURNS uuid
        LANGUAGE sql STABLE STRICT SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $$
            SELECT id FROM {REGISTRY_SCHEMA}.tenants
            WHERE access_key_hash = {access_key_hash_sql("presented")}
        $$
        """,
        f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC",
    ]


def registry_grants(role: str) -> list[str]:
    """What ``role`` (the application role) may do with the registry: read every column of
    ``tenancy.tenants`` but the access key hash, verify access keys, call the policy function.
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
    ]


FILL_SERIAL_DDL = f"""
CREATE OR REPLACE FUNCTION {REGISTRY_SCHEMA}.fill_serial() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- postgres_fdw sends every column, NULL for those not given: apply the sequence here.
    IF to_jsonb(NEW) -> TG_ARGV[0] = 'null'::jsonb THEN
        NEW := jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[0], nextval(TG_ARGV[1]::regclass)));
    END IF;
    RETURN NEW;
END $$
"""


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


def grant_statements(tenancy: Tenancy, role: str, tables: list[Table] | None = None) -> list[str]:
    """What the application role needs in the main database (on ``tables``, by default every table
    of the metadata), and nothing more."""
    r = quote_ident(role)
    statements = registry_grants(role)
    schemas = {t.schema for t in tenancy.metadata.tables.values() if t.schema}
    for schema in sorted(schemas):
        statements.append(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {r}")
    for table in tenancy.metadata.sorted_tables if tables is None else tables:
        statements.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {qualified_name(table)} TO {r}")
    return statements


def tenants_group(tenancy: Tenancy) -> str:
    """The NOLOGIN group role holding what every per-tenant role (a schema tenant's role, a
    database tenant's FDW role) may do with the infrastructure. Members inherit it; new tables get
    it through default privileges, so tenants created earlier are not left without access."""
    return f"{tenancy.name_prefix}_tenants"


def tenants_group_grants(tenancy: Tenancy, tables: list[Table] | None = None) -> list[str]:
    """Idempotent: read every infrastructure table, write the tenant-scoped ones (RLS confines the
    writes to the member's own tenant); global tables stay read-only for tenants."""
    group = tenants_group(tenancy)
    g, literal = quote_ident(group), quote_literal(group)
    statements = [
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {literal}) THEN "
        f"CREATE ROLE {g} NOLOGIN; END IF; END $$",
        f"GRANT CONNECT ON DATABASE {quote_ident(tenancy.admin_url.database or '')} TO {g}",
        f"GRANT USAGE ON SCHEMA {REGISTRY_SCHEMA} TO {g}",
    ]
    for schema in sorted(tenancy.infrastructure_schemas):
        s = quote_ident(schema)
        statements += [
            f"GRANT USAGE ON SCHEMA {s} TO {g}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {g}",
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {g}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT ON TABLES TO {g}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE, SELECT ON SEQUENCES TO {g}",
        ]
    infrastructure = tenancy.infrastructure_tables()
    for table in infrastructure if tables is None else [t for t in tables if t in infrastructure]:
        if is_tenant_scoped(table):
            statements.append(f"GRANT INSERT, UPDATE, DELETE ON {qualified_name(table)} TO {g}")
    return statements


def install(tenancy: Tenancy) -> None:
    check_tenant_keys(tenancy.metadata, infrastructure_schemas=tenancy.infrastructure_schemas)
    with tenancy.admin_engine.begin() as conn:
        conn.execute(text("select pg_advisory_xact_lock(:k)"), {"k": INSTALL_KEY})
        _install(tenancy, conn)
    tenancy.registry.invalidate()


def _install(tenancy: Tenancy, conn: Connection) -> None:
    ensure_registry(tenancy, conn)
    restrict_database(tenancy, conn)
    for schema in sorted({t.schema for t in tenancy.metadata.tables.values() if t.schema}):
        conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
    tenancy.metadata.create_all(conn, checkfirst=True)
    for table in tenancy.metadata.sorted_tables:
        if is_tenant_scoped(table):
            for statement in enable_rls_ddl(table, function_schema=REGISTRY_SCHEMA):
                conn.exec_driver_sql(statement)
    finish_tables(tenancy, conn, tenancy.metadata.sorted_tables)
    if tenancy.migrations is not None:
        _stamp_created(tenancy, conn)


def _stamp_created(tenancy: Tenancy, conn: Connection) -> None:
    """With migrations attached, what install() created from the models is at both streams'
    heads: stamp them (where no version table exists yet), so that migrations continue from there
    instead of replaying what exists."""
    from .versions import (
        STREAMS,
        VERSION_TABLES,
        config_stream_heads,
        format_revision,
        load_config,
    )
    from .versions import version_table_script as stamp

    assert tenancy.migrations is not None
    config = load_config(tenancy.migrations)
    for stream in STREAMS:
        table = f"{REGISTRY_SCHEMA}.{VERSION_TABLES[stream]}"
        if conn.execute(text("select to_regclass(:t)"), {"t": table}).scalar() is not None:
            continue
        heads = config_stream_heads(config, stream)
        conn.exec_driver_sql(stamp(REGISTRY_SCHEMA, stream, heads))
        if stream == "tenant":
            tenancy.store.set_revision(conn, format_revision(heads))


def restrict_database(tenancy: Tenancy, conn: Connection) -> None:
    """Take from ``PUBLIC`` what ``CREATE DATABASE`` gives it on the main database: ``TEMPORARY``
    (a temporary table one tenant creates can shadow another's tables on a pooled connection) and
    ``CONNECT`` (database tenants' login roles have no business there); grant ``CONNECT`` back to
    the application role. Only the database's owner can: for another admin role, a warning says
    what to run."""
    database = conn.exec_driver_sql("select current_database()").scalar()
    assert isinstance(database, str)
    db = quote_ident(database)
    app_role = tenancy.url.username
    owner = conn.exec_driver_sql(
        "select pg_has_role(current_user, datdba, 'USAGE') from pg_database "
        "where datname = current_database()"
    ).scalar()
    if owner:
        conn.exec_driver_sql(f"REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC")
        if app_role:
            conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {db} TO {quote_ident(app_role)}")
        return
    public = conn.exec_driver_sql(
        "select has_database_privilege('public', current_database(), 'TEMPORARY'), "
        "has_database_privilege('public', current_database(), 'CONNECT')"
    ).one()
    if any(public):
        logging.getLogger("sqla_tenancy.isolation").warning(
            "PUBLIC holds %s on the main database %s, and the admin role does not own it, so "
            "install() cannot take it back. As its owner, run: REVOKE CONNECT, TEMPORARY ON "
            "DATABASE %s FROM PUBLIC; GRANT CONNECT ON DATABASE %s TO %s",
            " and ".join(p for p, held in zip(("TEMPORARY", "CONNECT"), public, strict=True) if held),
            db,
            db,
            db,
            quote_ident(app_role or "<application role>"),
        )


def ensure_registry(tenancy: Tenancy, conn: Connection) -> None:
    """Create or bring up to date the ``tenancy`` schema: the registry table, its notification
    trigger, the policy function, the access key function, the serial-filling trigger function,
    the default tenant and the application role's registry grants.

    Idempotent; the Alembic extension runs it before the infrastructure stream. A registry made by
    an earlier version is migrated in place: plain access keys become their hashes (the keys keep
    working; the plain column is dropped), the slug CHECK constraint is added, and the application
    role's table-wide ``SELECT`` becomes a column grant that leaves out the key hashes."""
    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {REGISTRY_SCHEMA}")
    registry_metadata.create_all(conn, checkfirst=True)
    # columns added since a registry was first created
    conn.exec_driver_sql(f"ALTER TABLE {REGISTRY_SCHEMA}.tenants ADD COLUMN IF NOT EXISTS revision text")
    _hash_access_keys(conn)
    _ensure_slug_check(conn)
    function = current_tenant_function_ddl(REGISTRY_SCHEMA, fdw_prefix=tenancy.name_prefix)
    for statement in [*function, *access_key_function_ddl(), *registry_ddl(), FILL_SERIAL_DDL]:
        conn.exec_driver_sql(statement)
    if tenancy.default_tenant is not None:
        tenancy.store.ensure_default(conn, tenancy.default_tenant)
    # Nobody but the owner reads the table as a whole (so no role sees the key hashes).
    conn.exec_driver_sql(f"REVOKE SELECT ON {REGISTRY_SCHEMA}.tenants FROM PUBLIC")
    app_role = tenancy.url.username
    if app_role and app_role != tenancy.admin_url.username:
        for statement in registry_grants(app_role):
            conn.exec_driver_sql(statement)


def _has_column(conn: Connection, column: str) -> bool:
    return bool(
        conn.execute(
            text(
                "select 1 from pg_attribute where attrelid = CAST(:t AS regclass) and attname = :c "
                "and not attisdropped"
            ),
            {"t": f"{REGISTRY_SCHEMA}.tenants", "c": column},
        ).first()
    )


def _hash_access_keys(conn: Connection) -> None:
    """Registries of earlier versions kept each tenant's access key in plain text
    (``access_key uuid``): keep only its hash, so that the keys in use keep working."""
    table = f"{REGISTRY_SCHEMA}.tenants"
    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS access_key_hash bytea")
    if _has_column(conn, "access_key"):
        conn.exec_driver_sql(
            f"UPDATE {table} SET access_key_hash = {access_key_hash_sql('access_key')} "
            "WHERE access_key_hash IS NULL AND access_key IS NOT NULL"
        )
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN access_key")
        log.info("registry migrated: access keys are now stored as SHA-256 hashes only")
    conn.exec_driver_sql(
        f"CREATE UNIQUE INDEX IF NOT EXISTS tenants_access_key_hash_key ON {table} (access_key_hash)"
    )


def _ensure_slug_check(conn: Connection) -> None:
    """Add ``tenants_slug_check`` to a registry made before it existed. Rows that break it (slugs
    registered before slugs were matched whole, such as ``'acme\n'``) are named in a warning and
    the constraint is added ``NOT VALID``: it holds for every new or changed row, and is validated
    by the first run after those rows are gone."""
    table = f"{REGISTRY_SCHEMA}.tenants"
    validated = conn.execute(
        text(
            "select convalidated from pg_constraint where conrelid = CAST(:t AS regclass) "
            "and conname = 'tenants_slug_check'"
        ),
        {"t": table},
    ).scalar()
    if validated:
        return
    bad = list(
        conn.execute(text(f"select slug from {table} where not ({SLUG_CHECK}) order by slug")).scalars()
    )
    if validated is None:
        not_valid = " NOT VALID" if bad else ""
        conn.exec_driver_sql(
            f"ALTER TABLE {table} ADD CONSTRAINT tenants_slug_check CHECK ({SLUG_CHECK}){not_valid}"
        )
    elif not bad:
        conn.exec_driver_sql(f"ALTER TABLE {table} VALIDATE CONSTRAINT tenants_slug_check")
    if bad:
        log.warning(
            "The registry holds %d tenant(s) whose slug is not canonical: %s. No request can name "
            "them (references are matched exactly), and their rows cannot be updated until their "
            "slug is. Delete or rename them (as the admin role: UPDATE %s SET slug = ... WHERE "
            "slug = ...), then run install() or the migrations again to validate the constraint "
            "tenants_slug_check, which new rows already obey.",
            len(bad),
            ", ".join(repr(slug) for slug in bad),
            table,
        )


def finish_tables(tenancy: Tenancy, conn: Connection, tables: list[Table]) -> None:
    """Idempotently give the main database's ``tables`` (those that exist) what they need besides
    their DDL: the application role's grants, the tenants' group grants, and the triggers that
    fill infrastructure serial keys for foreign-table inserts."""
    existing = [
        t for t in tables if conn.execute(text("select to_regclass(:t)"), {"t": qualified_name(t)}).scalar()
    ]
    for table in existing:
        if table.schema in tenancy.infrastructure_schemas:
            for statement in fill_serial_ddl(conn, table):
                conn.exec_driver_sql(statement)
    for statement in tenants_group_grants(tenancy, existing):
        conn.exec_driver_sql(statement)
    app_role = tenancy.url.username
    if app_role and app_role != tenancy.admin_url.username:
        for statement in grant_statements(tenancy, app_role, existing):
            conn.exec_driver_sql(statement)
        # Sequences behind serial/identity columns.
        for schema in sorted({t.schema or "public" for t in existing}):
            conn.exec_driver_sql(
                f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {quote_ident(schema)} "
                f"TO {quote_ident(app_role)}"
            )
    # the anonymous requests' roles: SELECT on the opted-in tables only (sqla_tenancy.anonymous)
    for statement in main_database_ddl(tenancy, existing, app_role):
        conn.exec_driver_sql(statement)
