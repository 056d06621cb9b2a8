"""Moving a tenant to another placement: copy, verify, switch, remove the source.

Every move between the ``shared``, ``schema`` and ``database`` placements is possible, in both
directions, and a database tenant can move to another server. The steps (each named for the
fault injector and the ``step`` event) are:

1. ``move_read_only``: the tenant's writes to its tenant tables are refused, its reads served:
   a RESTRICTIVE policy per table and command, created where the rows are (the shared tables, the
   tenant's schema, or its own database) and committed before the copy, calls a function that
   raises ``read_only_sql_transaction`` naming the move. Enforced by the database on every
   connection, whatever a process's registry cache says; other tenants are not affected.
2. ``move_provision``: the target is provisioned by its placement's own code (a database target
   journaled in the tenant's registry row, under ``move_journal``, object by object).
3. ``move_copy``: each tenant table's rows, parents first, streamed with ``COPY ... TO STDOUT``
   from the source into ``COPY ... FROM STDIN`` at the target; the target's sequences are
   brought past the copied keys.
4. ``move_verify``: per table, the row count and an MD5 over the rows' text, source against target.
5. ``move_remove_source`` and ``move_switch``: the registry row is switched in one transaction on
   the main database. A source in the main database (shared rows, a schema) is removed in that
   same transaction; a source database is removed after it (``CREATE``/``DROP DATABASE`` cannot
   share a transaction), recorded in the row (``move_source``) until it is gone.

Infrastructure rows stay in the main database for every placement. Between ``shared`` and
``schema`` everything is one transaction after the read-only step. A failure before the switch
commits leaves the tenant active at its source with every row, writable again, and the target's
objects dropped (journaled database and roles, or a rolled-back transaction); a move interrupted
by a crash (reported by the doctor: ``move-interrupted``) is cleaned up by the next
``move_tenant`` of the tenant, and ``move_tenant`` to the placement the tenant is at only
undoes it. A failure while a source database is removed leaves the tenant active at its
target, with every row; running ``move_tenant`` to the same placement again finishes the
removal.

A schema or database tenant's keys come from its own sequences; moved into shared tables, they may
collide with another tenant's: the copy then fails on the primary key and nothing changes (the
error says which table).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Engine, Table, text

from . import locks
from .binding import migration_binding_statement
from .context import platform_context
from .errors import DeletionError, ProvisioningError, TenancyError, UnsupportedOperation
from .identifiers import quote_ident, quote_literal
from .lifecycle import wait_out
from .placements.database import DatabasePlacement, Names
from .registry import MOVE_GUARD_PREFIX, MOVE_JOURNAL_KEY, MOVE_SOURCE_KEY, REGISTRY_SCHEMA, Tenant
from .rls import qualified_name, tenant_column_name

if TYPE_CHECKING:
    import psycopg

    from .services import Services

__all__ = ["MOVABLE", "MoveError", "move_tenant"]

log = logging.getLogger("sqla_tenancy.lifecycle")

#: Seconds the switch waits for the transactions admitted at the source before giving up.
SWITCH_TIMEOUT = 30.0
#: The placements a tenant can be moved between.
MOVABLE = frozenset({"shared", "schema", "database"})
#: The placements whose tenants' rows are in the main database.
_MAIN = frozenset({"shared", "schema"})
#: Keys of the registry row's location during a move: the target's journaled objects, and a
#: source database still to remove once the switch committed.
JOURNAL_KEY = MOVE_JOURNAL_KEY
LEFTOVER_KEY = MOVE_SOURCE_KEY
#: Session settings that fix the rows' text for the checksums, whatever each server's defaults.
_TEXT_SETTINGS = (
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, MDY'; SET LOCAL IntervalStyle = 'postgres'; "
    "SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'"
)


class MoveError(ProvisioningError):
    """A move failed; the message says where the tenant is active (at its source, with every row,
    unless the switch had committed)."""


def _policy_name(tenant: Tenant) -> str:
    return f"{MOVE_GUARD_PREFIX}{tenant.id.hex}"


@dataclass(frozen=True)
class _Site:
    """Where a tenant's copy of the tenant tables is."""

    placement: str
    server: str = "main"
    database: str | None = None  # None: the main database
    schema: str | None = None  # a schema tenant's schema

    def table(self, table: Table) -> str:
        if self.placement == "shared":
            return qualified_name(table)
        return f"{quote_ident(self.schema or 'public')}.{quote_ident(table.name)}"


def _site(tenant: Tenant) -> _Site:
    location = tenant.location
    if tenant.strategy == "database":
        return _Site("database", str(location.get("server") or "main"), str(location["database"]))
    if tenant.strategy == "schema":
        return _Site("schema", schema=str(location["schema"]))
    return _Site("shared")


def move_tenant(services: Services, tenant: Tenant, placement: str, *, server: str | None) -> Tenant:
    """Move ``tenant`` to ``placement``; the tenant as the registry has it afterwards."""
    if LEFTOVER_KEY in tenant.location and placement == tenant.strategy and server is None:
        _remove_source_database(services, tenant)
        return services.registry.get(tenant.id)
    here = tenant.location.get("server") or "main"
    if placement == tenant.strategy and (server is None or server == here) and tenant.status == "active":
        # to where it is: the undoing of a move a crash interrupted, if there is one
        undone = _abandon(services, tenant)
        if undone is not None:
            return undone
    _check(services, tenant, placement, server)
    if tenant.strategy in _MAIN and placement in _MAIN:
        return _move_in_main(services, tenant, placement)
    return _move_across(services, tenant, placement, server)


def _check(services: Services, tenant: Tenant, placement: str, server: str | None) -> None:
    services.placement(placement)  # UnknownPlacement
    if tenant.is_default:
        raise UnsupportedOperation("The default tenant cannot be moved.")
    if tenant.status != "active":
        raise UnsupportedOperation(
            f"Tenant {tenant.slug!r} is {tenant.status}: only an active tenant can be moved."
        )
    if services.config.distributed:
        raise UnsupportedOperation(
            "Moving a tenant is not supported on a distributed (Citus) main database yet: the "
            "read-only policies and the copy have not been tested there."
        )
    if placement not in MOVABLE or tenant.strategy not in MOVABLE:
        raise UnsupportedOperation(
            f"Moving a tenant from {tenant.strategy} to {placement} is not supported: only between "
            f"{', '.join(sorted(MOVABLE))}."
        )
    if server is not None and placement != "database":
        raise UnsupportedOperation(f"server= applies to moves to the database placement, not to {placement}.")
    if placement == "database":
        services.placement("database").initial_location(server)  # ProvisioningError: unknown server
    here = tenant.location.get("server") or "main"
    if placement == tenant.strategy and (placement != "database" or (server or "main") == here):
        where = f" on server {here!r}" if placement == "database" else ""
        raise UnsupportedOperation(f"Tenant {tenant.slug!r} is a {placement} tenant{where} already.")


# -- read-only ---------------------------------------------------------------------------------


def _block_writes(engine: Engine, tenant: Tenant, tables: list[Table], site: _Site, target: str) -> None:
    """Refuse the tenant's writes to its tables at ``site`` with an error naming the move,
    committed (each ``CREATE POLICY`` waits for the transactions writing to its table); reads go on."""
    name = _policy_name(tenant)
    function = f"{REGISTRY_SCHEMA}.{quote_ident(name)}"
    message = (
        f"tenant {tenant.slug!r} is being moved from {tenant.strategy} to {target}: its writes are "
        "refused until the move ends (reads go on)"
    )
    literal = f"{quote_literal(str(tenant.id))}::uuid"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE FUNCTION {function}() RETURNS boolean LANGUAGE plpgsql AS $tenancy$ BEGIN "
            f"RAISE EXCEPTION USING MESSAGE = {quote_literal(message)}, "
            "ERRCODE = 'read_only_sql_transaction', "
            "HINT = 'Retry the write once the move is over (sqla-tenancy tenants show).'; END $tenancy$"
        )
        for table in tables:
            column = tenant_column_name(table)
            assert column is not None
            guard = f"CASE WHEN {quote_ident(column)} = {literal} THEN {function}() ELSE true END"
            for command, clause in (
                ("INSERT", f"WITH CHECK ({guard})"),
                ("UPDATE", f"USING ({guard})"),
                ("DELETE", f"USING ({guard})"),
            ):
                policy = quote_ident(f"{name}_{command.lower()}")
                conn.exec_driver_sql(
                    f"CREATE POLICY {policy} ON {site.table(table)} AS RESTRICTIVE FOR {command} {clause}"
                )


def _unblock_writes(conn: Connection, tenant: Tenant, tables: list[Table], site: _Site) -> None:
    """Drop what :func:`_block_writes` made at ``site`` (whatever of it exists), in ``conn``'s
    transaction."""
    name = _policy_name(tenant)
    present = set(
        conn.execute(
            text(
                "select c.oid::regclass::text from pg_policy p join pg_class c on c.oid = p.polrelid "
                "where p.polname like :name"
            ),
            {"name": f"{name}%"},
        ).scalars()
    )
    if present:
        for table in tables:
            for command in ("insert", "update", "delete"):
                policy = quote_ident(f"{name}_{command}")
                conn.exec_driver_sql(f"DROP POLICY IF EXISTS {policy} ON {site.table(table)}")
    conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {REGISTRY_SCHEMA}.{quote_ident(name)}()")


# -- between shared and schema: one transaction --------------------------------------------------


def _move_in_main(services: Services, tenant: Tenant, placement: str) -> Tenant:
    target_placement = services.placement(placement)
    steps = services.steps
    tables = _tenant_tables(services)
    source = _site(tenant)
    admin_engine = services.engines.admin
    blocked = False
    started = time.monotonic()
    with _tenant_lock(services, tenant):
        try:
            tenant = _current(services, tenant)
            _recover(services, tenant, tables, source, admin_engine)
            steps("move_read_only")
            _block_writes(admin_engine, tenant, tables, source, placement)
            blocked = True
            read_only = time.monotonic()
            # platform_context: the audit trail records the move's writes with this reason
            with (
                platform_context(f"move tenant {tenant.slug} to {placement}"),
                admin_engine.begin() as admin,
            ):
                steps("move_provision")
                draft = dataclasses.replace(tenant, strategy=placement, location={})
                location = {
                    **target_placement.initial_location(None),
                    **target_placement.provision(draft, admin=admin),
                }
                revision = location.pop("_revision", tenant.revision)
                target = _site(dataclasses.replace(draft, location=location))
                steps("move_copy")
                for table in tables:
                    _copy_in(admin, tenant, table, source, target)
                steps("move_verify")
                admin.exec_driver_sql(_TEXT_SETTINGS)
                for table in tables:
                    _verify(tenant, table, (admin, source), (admin, target))
                steps("move_remove_source")
                _unblock_writes(admin, tenant, tables, source)
                services.placement(tenant.strategy).deprovision(
                    tenant, admin=admin, keep_infrastructure_rows=True
                )
                steps("move_switch")
                _switch(services, admin, tenant, placement, location, revision)
            blocked = False  # the policies went with the switch's commit
        except BaseException as error:
            if blocked:
                with admin_engine.begin() as admin:
                    _unblock_writes(admin, tenant, tables, source)
            raise _failed(tenant, placement, error) from error
        finally:
            services.registry.invalidate([tenant.id])
    _log_moved(tenant, placement, started, read_only)
    return services.registry.get(tenant.id)


@contextmanager
def _tenant_lock(services: Services, tenant: Tenant) -> Iterator[None]:
    """The tenant's advisory lock, held for the whole move on a connection of its own: a
    migration, a deletion or another move of the tenant waits for the move to end."""
    with services.engines.admin.connect() as guard, locks.session_lock(guard, locks.tenant_key(tenant.slug)):
        yield


# -- to or from the database placement: journaled steps ------------------------------------------


def _move_across(services: Services, tenant: Tenant, placement: str, server: str | None) -> Tenant:
    database = cast(DatabasePlacement, services.placement("database"))
    steps = services.steps
    tables = _tenant_tables(services)
    source = _site(tenant)
    admin_engine = services.engines.admin
    engines: list[Engine] = []

    def engine_for(site: _Site) -> Engine:
        if site.database is None:
            return admin_engine
        engine = database.admin_engine(site.server, site.database)
        engines.append(engine)
        return engine

    started = time.monotonic()
    read_only = started
    blocked = journaled = switched = False
    reason = f"move tenant {tenant.slug} to {placement}"
    with _tenant_lock(services, tenant):
        source_engine = engine_for(source)
        try:
            tenant = _current(services, tenant)
            _recover(services, tenant, tables, source, source_engine)
            with platform_context(reason):
                if placement == "database":
                    # provisioned before the tenant turns read-only: CREATE DATABASE and the
                    # foreign schemas take most of the time, and need none of its rows
                    steps("move_provision")
                    journaled = True
                    names, location = _provision_database(services, database, tenant, source, server)
                    steps("move_read_only")
                    _block_writes(source_engine, tenant, tables, source, placement)
                    blocked = True
                    read_only = time.monotonic()
                    leftover = _to_database(
                        services, database, tenant, tables, source, source_engine, engine_for, names, location
                    )
                else:
                    steps("move_read_only")
                    _block_writes(source_engine, tenant, tables, source, placement)
                    blocked = True
                    read_only = time.monotonic()
                    steps("move_provision")
                    leftover = _to_main(services, database, tenant, tables, source, source_engine, placement)
                switched = True  # a source database goes later, its policies with it
            ended = time.monotonic()
            database.engines.tenants.discard(lambda key: key[0] == tenant.id)  # type: ignore[index]
            services.registry.invalidate([tenant.id])
            if leftover is not None:
                steps("move_remove_source")
                _remove_source_database(services, tenant, leftover)
        except BaseException as error:
            if not switched:
                problem = _undo(services, database, tenant, tables, source, source_engine, blocked, journaled)
                if problem is not None:
                    raise MoveError(
                        f"Moving tenant {tenant.slug!r} to {placement} failed ({type(error).__name__}: "
                        f"{error}), and so did its clean-up ({problem}): the tenant is active at its "
                        f"source ({tenant.strategy}) with all its rows, possibly still read-only; the "
                        f"next move_tenant({tenant.slug!r}, ...) cleans up first."
                    ) from error
                raise _failed(tenant, placement, error) from error
            raise MoveError(
                f"Tenant {tenant.slug!r} was moved to {placement} and is active there with all its "
                f"rows, but removing its former database failed ({type(error).__name__}: {error}); "
                f"rerun move_tenant({tenant.slug!r}, {placement!r}) to finish."
            ) from error
        finally:
            for engine in engines:
                engine.dispose()
            services.registry.invalidate([tenant.id])
    _log_moved(tenant, placement, started, read_only, ended)
    return services.registry.get(tenant.id)


def _provision_database(
    services: Services, database: DatabasePlacement, tenant: Tenant, source: _Site, server: str | None
) -> tuple[Names, dict[str, Any]]:
    """The target database on ``server``, journaled in the tenant's row object by object."""
    target_server = server or "main"

    def journal(*entries: dict[str, str]) -> None:
        with services.engines.admin.begin() as conn:
            if not services.store.journal(conn, tenant.id, JOURNAL_KEY, entries, status="active"):
                raise MoveError(
                    f"The registry row of tenant {tenant.slug!r} changed during the move (deleted or "
                    "suspended by another process); the move was stopped and undone."
                )

    # The source's login and anonymous roles hold the names on the main cluster.
    temporary = source.placement == "schema" and target_server == "main"
    names, location = database.provision_move_target(
        tenant,
        target_server,
        journal=journal,
        temporary_roles=temporary,
        fdw_role=source.placement != "database",  # a database source's FDW role serves on
    )
    return names, location


def _to_database(
    services: Services,
    database: DatabasePlacement,
    tenant: Tenant,
    tables: list[Table],
    source: _Site,
    source_engine: Engine,
    engine_for: Any,
    names: Names,
    location: dict[str, Any],
) -> dict[str, Any] | None:
    """Copy into, check and switch to the provisioned database ``names``."""
    steps = services.steps
    revision = location.pop("_revision", tenant.revision)
    target = _Site("database", names.server, names.database)
    target_engine = engine_for(target)
    steps("move_copy")
    with source_engine.begin() as src, target_engine.begin() as dst:
        for conn in (src, dst):
            conn.exec_driver_sql(migration_binding_statement(tenant.id))
        for table in tables:
            # the owner copies (COPY FROM refuses tables whose policies apply to the copier)
            dst.exec_driver_sql(f"ALTER TABLE {target.table(table)} NO FORCE ROW LEVEL SECURITY")
            _stream(src, dst, tenant, table, source, target)
            dst.exec_driver_sql(f"ALTER TABLE {target.table(table)} FORCE ROW LEVEL SECURITY")
    steps("move_verify")
    with source_engine.begin() as src, target_engine.begin() as dst:
        for conn in (src, dst):
            conn.exec_driver_sql(f"{migration_binding_statement(tenant.id)}; {_TEXT_SETTINGS}")
        for table in tables:
            _verify(tenant, table, (src, source), (dst, target))
    leftover = _leftover(database, tenant, source, fdw_role=False)
    with platform_context(f"move tenant {tenant.slug} to database"), services.engines.admin.begin() as admin:
        if source.database is None:
            steps("move_remove_source")
            _unblock_writes(admin, tenant, tables, source)
            services.placement(tenant.strategy).deprovision(
                tenant, admin=admin, keep_infrastructure_rows=True
            )
        for statement in database.rename_roles_sql(tenant, names):  # temporary names
            admin.exec_driver_sql(statement)
        steps("move_switch")
        if leftover is not None:
            location[LEFTOVER_KEY] = leftover
        _switch(services, admin, tenant, "database", location, revision)
    return leftover


def _to_main(
    services: Services,
    database: DatabasePlacement,
    tenant: Tenant,
    tables: list[Table],
    source: _Site,
    source_engine: Engine,
    placement: str,
) -> dict[str, Any]:
    """From a database, into the shared tables or a new schema: provision, copy, check and
    switch in one transaction on the main database; the source database goes afterwards."""
    steps = services.steps
    names = database.names(tenant)
    renamed: Names | None = None
    with services.engines.admin.begin() as admin:
        if placement == "schema" and source.server == "main":
            # a schema tenant's roles take the names the source's have: those step aside (the
            # source's sessions go on; new logins see the old names until this commits)
            stem = f"{services.config.name_prefix}-mv-{tenant.id.hex}"
            renamed = dataclasses.replace(names, app_role=f"{stem}-was-app", anon_role=f"{stem}-was-anon")
            for old, new in ((names.app_role, renamed.app_role), (names.anon_role, renamed.anon_role)):
                if admin.execute(text("select 1 from pg_roles where rolname = :r"), {"r": old}).first():
                    admin.exec_driver_sql(f"ALTER ROLE {quote_ident(old)} RENAME TO {quote_ident(new)}")
        target_placement = services.placement(placement)
        draft = dataclasses.replace(tenant, strategy=placement, location={})
        location = {
            **target_placement.initial_location(None),
            **target_placement.provision(draft, admin=admin),
        }
        revision = location.pop("_revision", tenant.revision)
        target = _site(dataclasses.replace(draft, location=location))
        steps("move_copy")
        with source_engine.begin() as src:
            src.exec_driver_sql(migration_binding_statement(tenant.id))
            for table in tables:
                _stream(src, admin, tenant, table, source, target)
                _continue_sequences(admin, table, target)
        steps("move_verify")
        admin.exec_driver_sql(_TEXT_SETTINGS)
        with source_engine.begin() as src:
            src.exec_driver_sql(f"{migration_binding_statement(tenant.id)}; {_TEXT_SETTINGS}")
            for table in tables:
                _verify(tenant, table, (src, source), (admin, target))
        steps("move_switch")
        leftover = _leftover(database, tenant, source, fdw_role=True, names=renamed)
        assert leftover is not None
        location[LEFTOVER_KEY] = leftover
        _switch(services, admin, tenant, placement, location, revision)
    return leftover


def _leftover(
    database: DatabasePlacement, tenant: Tenant, source: _Site, *, fdw_role: bool, names: Names | None = None
) -> dict[str, Any] | None:
    """What of a source database is removed after the switch (None: a source in the main database)."""
    if source.database is None:
        return None
    own = database.names(tenant)
    app_role = names.app_role if names is not None else str(tenant.location.get("role") or own.app_role)
    leftover: dict[str, Any] = {
        "server": source.server,
        "database": source.database,
        "roles": [app_role, (names or own).anon_role],
    }
    if fdw_role:
        leftover["fdw_role"] = str(tenant.location.get("fdw_role") or own.fdw_role)
    return leftover


def _remove_source_database(services: Services, tenant: Tenant, leftover: Any = None) -> None:
    """Drop the database a tenant moved away from (recorded in its row), then forget it."""
    database = cast(DatabasePlacement, services.placement("database"))
    if leftover is None:
        leftover = tenant.location.get(LEFTOVER_KEY)
    if isinstance(leftover, dict):
        database.drop_moved_source(tenant, leftover)
    with services.engines.admin.begin() as admin:
        services.store.drop_location_key(admin, tenant.id, LEFTOVER_KEY)
    services.registry.invalidate([tenant.id])
    log.info("removed the former database of tenant %s", tenant.slug)


def _switch(
    services: Services,
    admin: Connection,
    tenant: Tenant,
    placement: str,
    location: dict[str, Any],
    revision: str | None,
) -> None:
    location.pop(JOURNAL_KEY, None)
    if services.placement(tenant.strategy).admitted:
        # The transactions tenancy.admit() admitted for the source end first, and new ones
        # wait until the switch commits; after it, a process whose cache still routes the tenant
        # to its source is refused there (the admission checks the placement): nothing is written
        # where the tenant no longer is.
        try:
            wait_out(admin, tenant, SWITCH_TIMEOUT)
        except DeletionError as error:
            raise MoveError(
                f"Transactions of tenant {tenant.slug!r} were still running at its source after "
                f"{SWITCH_TIMEOUT:g} s, so the move did not switch; it is active at its source with "
                f"all its rows. Let them finish (or end them) and move it again. ({error})"
            ) from error
    if not services.store.move(admin, tenant, placement=placement, location=location, revision=revision):
        raise MoveError(
            f"The registry row of tenant {tenant.slug!r} changed during the move (deleted, "
            "suspended or moved by another process); nothing was moved."
        )


def _current(services: Services, tenant: Tenant) -> Tenant:
    with services.engines.admin.connect() as conn:
        row = services.store.get(conn, tenant.id)
    if row is None or row.status != "active" or row.strategy != tenant.strategy:
        raise MoveError(f"Tenant {tenant.slug!r} changed before its move started; nothing was moved.")
    return row


def _abandon(services: Services, tenant: Tenant) -> Tenant | None:
    """Undo a move of ``tenant`` that a crash interrupted (its read-only guard left where its rows
    are, or its target's objects journaled in its row): the tenant, writable again where it
    was, with the target's objects dropped; ``None`` when no move of it was interrupted."""
    database = cast(DatabasePlacement, services.placement("database"))
    source = _site(tenant)
    engine = (
        services.engines.admin
        if source.database is None
        else database.admin_engine(source.server, source.database)
    )
    try:
        with _tenant_lock(services, tenant):
            tenant = _current(services, tenant)
            with engine.connect() as conn:
                guarded = conn.execute(
                    text("select to_regprocedure(:f) is not null"),
                    {"f": f"{REGISTRY_SCHEMA}.{_policy_name(tenant)}()"},
                ).scalar()
            if not guarded and not tenant.location.get(JOURNAL_KEY):
                return None
            _recover(services, tenant, _tenant_tables(services), source, engine)
    finally:
        if engine is not services.engines.admin:
            engine.dispose()
    services.registry.invalidate([tenant.id])
    log.warning(
        "undid the interrupted move of tenant %s: writable again as a %s tenant", tenant.slug, tenant.strategy
    )
    return services.registry.get(tenant.id)


def _recover(
    services: Services, tenant: Tenant, tables: list[Table], source: _Site, source_engine: Engine
) -> None:
    """Clean up after a move of ``tenant`` that a crash interrupted: its target's journaled
    objects, and the source's read-only policies."""
    journal = tenant.location.get(JOURNAL_KEY)
    if journal:
        log.warning("cleaning up an interrupted move of tenant %s", tenant.slug)
        database = cast(DatabasePlacement, services.placement("database"))
        database.compensate_entries(tenant, [e for e in journal if isinstance(e, dict)])
        with services.engines.admin.begin() as admin:
            services.store.drop_location_key(admin, tenant.id, JOURNAL_KEY)
    with source_engine.begin() as conn:
        _unblock_writes(conn, tenant, tables, source)


def _undo(
    services: Services,
    database: DatabasePlacement,
    tenant: Tenant,
    tables: list[Table],
    source: _Site,
    source_engine: Engine,
    blocked: bool,
    journaled: bool,
) -> str | None:
    """After a failure before the switch: drop the target's journaled objects, then let the
    source be written again. What stopped the clean-up, if anything (the next move finishes it)."""
    try:
        if journaled:
            with services.engines.admin.connect() as conn:
                row = services.store.get(conn, tenant.id)
            entries = row.location.get(JOURNAL_KEY, []) if row is not None else []
            database.compensate_entries(tenant, [e for e in entries if isinstance(e, dict)])
            with services.engines.admin.begin() as admin:
                services.store.drop_location_key(admin, tenant.id, JOURNAL_KEY)
        if blocked:
            with source_engine.begin() as conn:
                _unblock_writes(conn, tenant, tables, source)
    except Exception as error:
        log.exception("clean-up of the failed move of tenant %s stopped", tenant.slug)
        return f"{type(error).__name__}: {error}"
    return None


def _failed(tenant: Tenant, placement: str, error: BaseException) -> MoveError | BaseException:
    if isinstance(error, MoveError) or not isinstance(error, Exception):
        return error
    if isinstance(error, TenancyError):
        return MoveError(
            f"Moving tenant {tenant.slug!r} to {placement} failed: {error}; it is active at "
            f"its source ({tenant.strategy}), with all its rows."
        )
    return MoveError(
        f"Moving tenant {tenant.slug!r} to {placement} failed at {type(error).__name__}: {error}; "
        f"it is active at its source ({tenant.strategy}), with all its rows, and the move can "
        "be retried."
    )


def _log_moved(
    tenant: Tenant, placement: str, started: float, read_only: float, ended: float | None = None
) -> None:
    now = time.monotonic()
    log.info(
        "moved tenant %s from %s to %s in %.3f s (read-only for %.3f s)",
        tenant.slug,
        tenant.strategy,
        placement,
        now - started,
        (ended or now) - read_only,
    )


# -- rows ----------------------------------------------------------------------------------------


def _tenant_tables(services: Services) -> list[Table]:
    config = services.config
    tenant_tables = config.tenant_tables()
    return [t for t in config.metadata.sorted_tables if t in tenant_tables]


def _columns(table: Table) -> str:
    return ", ".join(quote_ident(c.name) for c in table.columns if c.computed is None)


def _rows(tenant: Tenant, table: Table, site: _Site) -> str:
    column = tenant_column_name(table)
    assert column is not None
    return (
        f"select {_columns(table)} from {site.table(table)} "
        f"where {quote_ident(column)} = {quote_literal(str(tenant.id))}::uuid"
    )


def _copy_in(admin: Connection, tenant: Tenant, table: Table, source: _Site, target: _Site) -> None:
    """Within the main database: one ``INSERT ... SELECT``."""
    admin.exec_driver_sql(
        f"INSERT INTO {target.table(table)} ({_columns(table)}) OVERRIDING SYSTEM VALUE "
        f"{_rows(tenant, table, source)}"
    )
    _continue_sequences(admin, table, target)


def _stream(
    src: Connection, dst: Connection, tenant: Tenant, table: Table, source: _Site, target: _Site
) -> None:
    """Between two databases: ``COPY ... TO STDOUT`` on ``src`` fed to ``COPY ... FROM STDIN`` on
    ``dst``, block by block (each connection in its transaction); sequences follow."""
    reader = cast("psycopg.Connection[Any]", src.connection.dbapi_connection)
    writer = cast("psycopg.Connection[Any]", dst.connection.dbapi_connection)
    out_sql = f"COPY ({_rows(tenant, table, source)}) TO STDOUT"
    in_sql = f"COPY {target.table(table)} ({_columns(table)}) FROM STDIN"
    with reader.cursor() as out_cursor, writer.cursor() as in_cursor:
        with out_cursor.copy(out_sql) as out, in_cursor.copy(in_sql) as into:
            for block in out:
                into.write(block)
    if target.placement == "database":
        _continue_sequences(dst, table, target)


def _continue_sequences(conn: Connection, table: Table, target: _Site) -> None:
    """Bring the target's sequences past the copied keys: a schema's or a database's own to just
    after them; the shared tables' (which other tenants draw from) only ever forward."""
    destination = target.table(table)
    for column in table.columns:
        if not (column.primary_key or column.identity is not None):
            continue
        sequence = conn.execute(
            text("select pg_get_serial_sequence(:t, :c)"), {"t": destination, "c": column.name}
        ).scalar()
        if sequence is None:
            continue
        highest = f"(select max({quote_ident(column.name)}) from {destination})"
        if target.placement == "shared":
            conn.execute(
                text(
                    f"select setval(CAST(:s AS regclass), m) from (select {highest} as m) h "
                    f"where m >= (select last_value from {sequence})"
                ),
                {"s": sequence},
            )
        else:
            conn.execute(
                text(f"select setval(CAST(:s AS regclass), coalesce({highest}, 0) + 1, false)"),
                {"s": sequence},
            )


def _digest(conn: Connection, tenant: Tenant, table: Table, site: _Site) -> tuple[int, str]:
    row: Any = conn.execute(
        text(
            "select count(*), md5(coalesce(string_agg(r::text, E'\\n' order by r::text collate \"C\"), '')) "
            f"from ({_rows(tenant, table, site)}) r"
        )
    ).one()
    return int(row[0]), str(row[1])


def _verify(
    tenant: Tenant, table: Table, source: tuple[Connection, _Site], target: tuple[Connection, _Site]
) -> None:
    before, after = _digest(source[0], tenant, table, source[1]), _digest(target[0], tenant, table, target[1])
    if before != after:
        raise MoveError(
            f"The copy of {table.fullname} for tenant {tenant.slug!r} does not match its source "
            f"({before[0]} rows, md5 {before[1]}; copied {after[0]} rows, md5 {after[1]}): nothing "
            "was moved."
        )
