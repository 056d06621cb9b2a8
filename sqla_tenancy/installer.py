"""``Tenancy.install()``: the quick-start path that creates everything the main database needs.

Idempotent and serialised by an advisory lock, so two processes starting together do not race.
The Alembic extension is the production path; both build their DDL from :mod:`sqla_tenancy.rls`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, text

from .anonymous import anonymous_role
from .binding import ADMIT_FUNCTION, ADMIT_PROCEDURE, REFUSED_SQLSTATE
from .distribution import distribute_tables, prepare_distributed_ddl
from .grants import finish_tables, keeper_upgrades, registry_grants
from .identifiers import quote_ident, quote_literal
from .keys import check_tenant_keys
from .locks import GRANTS_KEY, INSTALL_KEY, SERVING_PREFIX, XACT_LOCK
from .placements.base import run_script
from .privileges import require_admin_attributes
from .registry import (
    ACCESS_KEY_FUNCTION,
    NOTIFY_CHANNEL,
    REGISTRY_SCHEMA,
    SLUG_CHECK,
    STATUSES,
    Registry,
    TenantStore,
    access_key_hash_sql,
    registry_metadata,
)
from .rls import current_tenant_function_ddl, enable_rls_ddl, is_tenant_scoped

if TYPE_CHECKING:
    from .config import TenancyConfig

__all__ = [
    "access_key_function_ddl",
    "ensure_registry",
    "install",
    "registry_ddl",
    "restrict_database",
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


def _admission_routines() -> list[tuple[str, str, str]]:
    """``tenancy.admit(tenant uuid, placement text)`` (a procedure) and the functions
    ``tenancy.admit_tenant(tenant uuid, placement text)`` and ``(tenant uuid)`` of earlier
    versions: the first statement of every shared
    or schema tenant transaction's binding (:func:`~sqla_tenancy.binding.admit_statement`): it
    takes the tenant's serving lock shared, without waiting, and checks that the tenant is active
    and still of the placement the caller's route is for, else raises (SQLSTATE ``TNREF``). A
    deletion, or the switch of a move, holds that lock exclusively (so it waits out the
    transactions in flight, and new ones are refused meanwhile) and then removes or moves the
    registry row (so later ones are refused): no transaction of a deleted tenant commits after
    its rows went, and none of a moved tenant writes where it no longer is.

    The row is read with a snapshot, the lock is not: a snapshot taken before a stop (a
    deletion, suspension or move) committed and a lock taken after the stop released it again
    (a backend not scheduled for that long) would admit the stopped tenant. So the row version
    read must be shown current once the lock is held. The procedure's one query takes the lock
    before it reads the version's ``xmax`` (a ``CASE`` orders the two): zero means that no
    transaction ever updated, deleted or locked that version, so it is the current one. Else
    ``tenancy.admit_tenant(uuid, text)`` decides, which takes the lock first and reads the row
    afterwards: under read committed its query's own snapshot is then newer than the lock; under
    repeatable read and serializable, whose snapshot is the transaction's, the transaction in
    ``xmax`` must not be one that committed unseen by the snapshot, else the transaction is refused with
    ``serialization_failure`` (retried, it is refused or admitted on current data). A version
    whose ``xmax`` is a rolled-back or unfinished update, or a lock, is admitted; only such
    versions (rare: the library updates the registry's rows, it does not lock them) pay for the
    second query. One case stays unjudged under repeatable read and serializable: an ``xmax``
    that is a multixact (a change made while another transaction held a row lock on the row,
    which only a foreign key to ``tenancy.tenants`` would take) is read as a transaction id.
    The one-argument form (status only) stays for processes of earlier versions.
    All of them run as the caller (the application role reads the columns they need).

    Each is given as what ``CREATE OR REPLACE`` makes, its signature and its PL/pgSQL body."""
    refusal = (
        f"USING ERRCODE = {quote_literal(REFUSED_SQLSTATE)}, "
        "HINT = 'The registry cache of the process that sent it here had not caught up yet.'"
    )
    qualified_key = f"pg_catalog.hashtext(pg_catalog.textcat({quote_literal(SERVING_PREFIX)}, tenant::text))"
    lock = f"pg_catalog.pg_try_advisory_xact_lock_shared({qualified_key})"
    eq = "OPERATOR(pg_catalog.=)"
    return [
        (
            f"FUNCTION {ADMIT_FUNCTION}(tenant uuid, placement text) RETURNS void",
            f"{ADMIT_FUNCTION}(uuid, text)",
            f"""
        DECLARE
            touched pg_catalog.xid;
            horizon bigint;
            distance bigint;
            changer pg_catalog.xid8;
        BEGIN
            IF {lock} THEN
                -- under read committed, this query's snapshot is newer than the lock
                SELECT t.xmax INTO touched FROM {REGISTRY_SCHEMA}.tenants t
                WHERE t.id {eq} tenant AND t.status {eq} 'active' AND t.strategy {eq} placement;
                IF FOUND THEN
                    IF touched {eq} '0'::pg_catalog.xid
                       OR pg_catalog.current_setting('transaction_isolation') {eq} 'read committed' THEN
                        RETURN;
                    END IF;
                    -- the transaction's snapshot is older than the lock: was the version read
                    -- changed by a transaction that committed unseen by it?
                    horizon := pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text::bigint;
                    distance := touched::text::bigint
                                OPERATOR(pg_catalog.-) (horizon OPERATOR(pg_catalog.&) 4294967295);
                    IF distance OPERATOR(pg_catalog.>) 2147483647 THEN
                        distance := distance OPERATOR(pg_catalog.-) 4294967296;
                    ELSIF distance OPERATOR(pg_catalog.<) -2147483648 THEN
                        distance := distance OPERATOR(pg_catalog.+) 4294967296;
                    END IF;
                    BEGIN
                        changer := (horizon OPERATOR(pg_catalog.+) distance)::text::pg_catalog.xid8;
                        IF pg_catalog.pg_xact_status(changer) IS DISTINCT FROM 'committed'
                           OR pg_catalog.pg_visible_in_snapshot(changer,
                                                                pg_catalog.pg_current_snapshot()) THEN
                            RETURN;  -- rolled back, unfinished (a stop waits for this lock), or seen
                        END IF;
                    EXCEPTION WHEN OTHERS THEN
                        NULL;  -- no transaction's status to be had: taken for a change
                    END;
                    RAISE EXCEPTION 'tenant %% changed in the registry after this transaction''s '
                                    'snapshot was taken; retry the transaction', tenant
                        USING ERRCODE = 'serialization_failure';
                END IF;
            END IF;
            RAISE EXCEPTION 'tenant %% may not be served as a %% tenant: it is suspended, being '
                            'deleted, moved or gone', tenant, placement
                {refusal};
        END """,
        ),
        (
            f"FUNCTION {ADMIT_FUNCTION}(tenant uuid) RETURNS void",
            f"{ADMIT_FUNCTION}(uuid)",
            f"""
        BEGIN
            PERFORM {ADMIT_FUNCTION}(tenant, (SELECT t.strategy FROM {REGISTRY_SCHEMA}.tenants t
                                              WHERE t.id {eq} tenant));
        END """,
        ),
        # What bindings CALL since this version: one query that takes the lock and then reads
        # the row version's xmax (a utility statement: no plan and no result row for the server
        # to make). Its operators are schema-qualified: it runs with whatever search_path the
        # connection had before the binding pinned it.
        (
            f"PROCEDURE {ADMIT_PROCEDURE}(tenant uuid, placement text)",
            f"{ADMIT_PROCEDURE}(uuid, text)",
            f"""
        BEGIN
            PERFORM FROM {REGISTRY_SCHEMA}.tenants
            WHERE id {eq} tenant
              AND status {eq} 'active'
              AND strategy {eq} placement
              AND CASE WHEN {lock} THEN xmax {eq} '0'::pg_catalog.xid END;
            IF NOT FOUND THEN
                PERFORM {ADMIT_FUNCTION}(tenant, placement);
            END IF;
        END """,
        ),
    ]


def admit_function_ddl() -> list[str]:
    """The statements that make the admission's routines (:func:`_admission_routines`), run by
    ``install()``: each is replaced, and only the roles granted it may run it."""
    routines = _admission_routines()
    return [
        *(f"CREATE OR REPLACE {made} LANGUAGE plpgsql AS $${body}$$" for made, _, body in routines),
        *(f"REVOKE ALL ON {made.split()[0]} {signature} FROM PUBLIC" for made, signature, _ in routines),
    ]


def outdated_admission(conn: Connection) -> list[str]:
    """The admission's routines that the main database (``conn``) lacks, or has in another
    version than this library's (an ``install()`` of this version replaces them)."""
    outdated = []
    for _, signature, body in _admission_routines():
        source = conn.execute(
            text("select prosrc from pg_catalog.pg_proc where oid = pg_catalog.to_regprocedure(:s)"),
            {"s": signature},
        ).scalar()
        if source != body.replace("%%", "%"):  # (the DDL runs through the driver's %-escaping)
            outdated.append(signature)
    return outdated


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


def node_login_ddl(config: TenancyConfig) -> list[str]:
    """On Citus (``distributed=True``) with a secret key: the shared placement's anonymous role
    may log in, with a password derived from the key, since the coordinator reaches the workers
    as the current role (see ``docs/scale-out.md``); without a key it stays ``NOLOGIN`` and
    anonymous requests are refused there. Nothing on plain PostgreSQL."""
    if not config.distributed or not config.has_secret():
        return []
    from .passwords import derive_password, scram_verifier

    role = anonymous_role(config)
    verifier = scram_verifier(
        derive_password(config.secret(), role), iterations=config.tenant_scram_iterations
    )
    return [f"ALTER ROLE {quote_ident(role)} LOGIN PASSWORD {quote_literal(verifier)}"]


def install(config: TenancyConfig, admin: Engine, registry: Registry) -> None:
    """Create, idempotently and under one advisory lock, everything the main database needs."""
    check_tenant_keys(config.metadata, infrastructure_schemas=config.infrastructure_schemas)
    with admin.begin() as conn:
        conn.execute(text("select pg_advisory_xact_lock(:k)"), {"k": INSTALL_KEY})
        _install(config, conn)
    if config.distributed:
        # Citus creates a schema made in a busy transaction on the workers only once that
        # transaction commits: distribute in the next one.
        with admin.begin() as conn:
            conn.execute(text("select pg_advisory_xact_lock(:k)"), {"k": INSTALL_KEY})
            prepare_distributed_ddl(conn)
            distribute_tables(config, conn)
    registry.invalidate()


def _install(config: TenancyConfig, conn: Connection) -> None:
    ensure_registry(config, conn)
    restrict_database(config, conn)
    for schema in sorted({t.schema for t in config.metadata.tables.values() if t.schema}):
        conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
    config.metadata.create_all(conn, checkfirst=True)
    for table in config.metadata.sorted_tables:
        if is_tenant_scoped(table):
            for statement in enable_rls_ddl(table, function_schema=REGISTRY_SCHEMA):
                conn.exec_driver_sql(statement)
    finish_tables(config, conn, config.metadata.sorted_tables)
    for statement in node_login_ddl(config):
        conn.exec_driver_sql(statement)
    if config.alembic_config is not None:
        _stamp_created(config, conn)


def _stamp_created(config: TenancyConfig, conn: Connection) -> None:
    """With migrations attached, what install() created from the models is at both streams'
    heads: stamp them (where no version table exists yet), so that migrations continue from there
    instead of replaying what exists."""
    from .versions import STREAMS, VERSION_TABLES, config_stream_heads, format_revision
    from .versions import version_table_script as stamp

    for stream in STREAMS:
        table = f"{REGISTRY_SCHEMA}.{VERSION_TABLES[stream]}"
        if conn.execute(text("select to_regclass(:t)"), {"t": table}).scalar() is not None:
            continue
        heads = config_stream_heads(config.alembic_config, stream)
        conn.exec_driver_sql(stamp(REGISTRY_SCHEMA, stream, heads))
        if stream == "tenant":
            TenantStore().set_revision(conn, format_revision(heads))


def restrict_database(config: TenancyConfig, conn: Connection) -> None:
    """Take from ``PUBLIC`` what ``CREATE DATABASE`` gives it on the main database: ``TEMPORARY``
    (a temporary table one tenant creates can shadow another's tables on a pooled connection) and
    ``CONNECT`` (database tenants' login roles have no business there); grant ``CONNECT`` back to
    the application role. Only the database's owner can: for another admin role, a warning says
    what to run."""
    database = conn.exec_driver_sql("select current_database()").scalar()
    assert isinstance(database, str)
    db = quote_ident(database)
    app_role = config.app_role
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


def ensure_registry(config: TenancyConfig, conn: Connection) -> None:
    """Create or bring up to date the ``tenancy`` schema: the registry table, its notification
    trigger, the policy function, the access key function, the serial-filling trigger function,
    the default tenant and the application role's registry grants.

    Idempotent; the Alembic extension runs it before the infrastructure stream. A registry made by
    an earlier version is migrated in place: plain access keys become their hashes (the keys keep
    working; the plain column is dropped), the slug CHECK constraint is added, and the application
    role's table-wide ``SELECT`` becomes a column grant that leaves out the key hashes."""
    require_admin_attributes(conn, ("CREATEROLE", "BYPASSRLS"), doing="Installing sqla-tenancy")
    # before the first catalog row it rewrites: provisionings grant on the same objects
    conn.execute(text(XACT_LOCK), {"key": GRANTS_KEY})
    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {REGISTRY_SCHEMA}")
    registry_metadata.create_all(conn, checkfirst=True)
    # columns added since a registry was first created
    conn.exec_driver_sql(f"ALTER TABLE {REGISTRY_SCHEMA}.tenants ADD COLUMN IF NOT EXISTS revision text")
    _hash_access_keys(conn)
    _ensure_slug_check(conn)
    _ensure_status_check(conn)
    function = current_tenant_function_ddl(REGISTRY_SCHEMA, fdw_prefix=config.name_prefix)
    for statement in [
        *function,
        *access_key_function_ddl(),
        *admit_function_ddl(),
        *registry_ddl(),
        FILL_SERIAL_DDL,
    ]:
        conn.exec_driver_sql(statement)
    for script in keeper_upgrades(conn, config):  # earlier versions' keepers learn to drop roles
        run_script(conn, script)  # (GRANTS_KEY held: taken above)
    if config.default_tenant is not None:
        TenantStore().ensure_default(conn, config.default_tenant)
    # Nobody but the owner reads the table as a whole (so no role sees the key hashes).
    conn.exec_driver_sql(f"REVOKE SELECT ON {REGISTRY_SCHEMA}.tenants FROM PUBLIC")
    app_role = config.url.username
    if app_role and app_role != config.admin_url.username:
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


def _ensure_status_check(conn: Connection) -> None:
    """Bring ``tenants_status_check`` up to :data:`~sqla_tenancy.registry.STATUSES` (registries
    made before the ``pending`` status of the tenant pool)."""
    table = f"{REGISTRY_SCHEMA}.tenants"
    definition = conn.execute(
        text(
            "select pg_get_constraintdef(oid) from pg_constraint where conrelid = CAST(:t AS regclass) "
            "and conname = 'tenants_status_check'"
        ),
        {"t": table},
    ).scalar()
    if definition is not None and all(f"'{status}'" in definition for status in STATUSES):
        return
    allowed = ", ".join(f"'{status}'" for status in STATUSES)
    conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS tenants_status_check")
    conn.exec_driver_sql(
        f"ALTER TABLE {table} ADD CONSTRAINT tenants_status_check CHECK (status IN ({allowed}))"
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
