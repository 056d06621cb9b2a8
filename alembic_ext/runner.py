"""Apply one stream at one location, in one transaction, and keep the registry's copy in step.

This is the unit of work of both ``alembic upgrade`` (through the ``env.py`` helper) and the fleet
runner's worker processes. A location's migrations, its version row and (for the main database
and schema tenants, which live in the main database) the registry's copy of its revision commit
together; a database tenant's copy is written right after its own commit, and a copy left behind
by a crash in between only makes the next run look at that tenant again.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.pool import NullPool

from sqla_tenancy import locks
from sqla_tenancy.alembic_compat import downgrade_steps, stamp_steps, upgrade_steps
from sqla_tenancy.binding import UNBIND
from sqla_tenancy.distribution import deferring_distribution, distribute_table, prepare_distributed_ddl
from sqla_tenancy.grants import finish_tables
from sqla_tenancy.identifiers import quote_ident
from sqla_tenancy.installer import ensure_registry, node_login_ddl
from sqla_tenancy.registry import REGISTRY_SCHEMA, TenantStore

from .locations import MIGRATED_STATUSES, Location, update_registry_copy
from .versions import INFRASTRUCTURE, TENANT, VERSION_TABLES, format_revision, has_stream

if TYPE_CHECKING:
    from sqla_tenancy.tenancy import Tenancy

__all__ = ["LocationRunner", "Outcome", "fleet_lock", "tenant_lock"]

log = logging.getLogger("alembic_ext")

Command = Literal["upgrade", "downgrade", "stamp", "display"]


@dataclass
class Outcome:
    """What happened at one location (one line of the fleet report)."""

    location: str
    kind: str
    stream: str
    before: str | None
    after: str | None
    seconds: float
    status: Literal["upgraded", "unchanged", "failed", "not_run"]
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "kind": self.kind,
            "stream": self.stream,
            "before": self.before,
            "after": self.after,
            "duration_ms": round(self.seconds * 1000, 2),
            "status": self.status,
            "error": self.error,
        }


@contextmanager
def fleet_lock(control: Connection, *, wait: bool) -> Iterator[None]:
    """Hold the migration lock on ``control`` for the block. With ``wait=False`` a run that finds it
    taken raises :class:`MigrationLocked` naming the holder; otherwise it waits (and says so)."""
    from .errors import MigrationLocked

    key = {"key": locks.MIGRATION_KEY}
    if not control.execute(text(locks.TRY_LOCK), key).scalar():
        holder = control.execute(text(locks.HOLDER), key).first()
        who = (
            f"backend pid {holder.pid} ({holder.application_name or 'no application_name'}, "
            f"connected since {holder.backend_start:%Y-%m-%d %H:%M:%S})"
            if holder is not None
            else "another session"
        )
        control.commit()
        if not wait:
            raise MigrationLocked(
                f"Another migration run holds the fleet lock: {who}. Wait for it to finish, or "
                "pass --wait to queue behind it."
            )
        log.warning("waiting for another migration run to finish: %s", who)
        control.execute(text(locks.LOCK), key)
    control.commit()
    try:
        yield
    finally:
        control.execute(text(locks.UNLOCK), key)
        control.commit()


@contextmanager
def tenant_lock(control: Connection, slug: str) -> Iterator[None]:
    """Serialise a tenant's migration with its provisioning (and deletion)."""
    with locks.session_lock(control, locks.tenant_key(slug)):
        yield


_database: contextvars.ContextVar[str] = contextvars.ContextVar("alembic_ext_database")


class LocationRunner:
    """Runs one Alembic command at locations, through one :class:`EnvironmentContext`.

    :param command: ``upgrade``, ``downgrade`` or ``stamp`` (with ``destination``), or
        ``display`` (``alembic current`` and the like: ``display_fn`` is called per location).
    :param configure_options: extra keyword arguments for ``EnvironmentContext.configure``.
    """

    def __init__(
        self,
        tenancy: Tenancy,
        env: EnvironmentContext,
        *,
        command: Command,
        destination: str | tuple[str, ...] | None = None,
        display_fn: Callable[..., Any] | None = None,
        configure_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.tenancy = tenancy
        self.env = env
        self.script: ScriptDirectory = env.script
        self.command = command
        self.destination = destination
        self.display_fn = display_fn
        self.options = dict(configure_options or {})
        self._engines: dict[str, Engine] = {}
        self._seen: tuple[str | None, bool] | None = None
        self._lineage: dict[str, frozenset[str]] = {}

    # -- connections --------------------------------------------------------------------------

    def _server_engine(self, server: str) -> Engine:
        """One engine per server whose connections go to the database named by ``_database``
        (one dialect initialisation per server, not one per tenant database)."""
        engine = self._engines.get(server)
        if engine is None:
            engine = create_engine(self.tenancy.server_admin_url(server), poolclass=NullPool)

            @event.listens_for(engine, "do_connect")
            def _pick_database(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
                cparams["dbname"] = _database.get()

            self._engines[server] = engine
        return engine

    @contextmanager
    def _connect(self, server: str, database: str) -> Iterator[Connection]:
        token = _database.set(database)
        try:
            with self._server_engine(server).connect() as conn:
                yield conn
        finally:
            _database.reset(token)

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    # -- destinations -------------------------------------------------------------------------

    def _stream_revisions(self, stream: str) -> frozenset[str]:
        if stream not in self._lineage:
            revisions = (
                {r.revision for r in self.script.walk_revisions("base", f"{stream}@head")}
                if has_stream(self.script, stream)
                else set()
            )
            self._lineage[stream] = frozenset(revisions)
        return self._lineage[stream]

    def destination_for(self, stream: str, current: tuple[str, ...]) -> str | tuple[str, ...] | None:
        """The command's destination translated for one stream (None: it names another stream's
        revision, so there is nothing to do here)."""
        dest = self.destination
        if dest is None:
            return None
        if isinstance(dest, tuple):
            picked = tuple(d for d in (self.destination_for_one(stream, d, current) for d in dest) if d)
            return picked or None
        return self.destination_for_one(stream, dest, current)

    def destination_for_one(self, stream: str, dest: str, current: tuple[str, ...]) -> str | None:
        if dest in ("head", "heads"):
            return f"{stream}@head" if self._stream_revisions(stream) else None
        if dest == "base":
            return "base"
        if dest[:1] in "+-" and dest[1:].isdigit():
            return dest if current else f"{stream}@{dest}"
        if "@" in dest:
            label = dest.split("@", 1)[0]
            return dest if label == stream else None
        revision = self.script.get_revision(dest)
        if revision is None or revision.revision not in self._stream_revisions(stream):
            return None
        return revision.revision

    def stream_fn(self, stream: str) -> Callable[[Any, Any], Any]:
        """The migration function Alembic calls for ``stream`` (the command, translated)."""
        if self.command == "display":
            assert self.display_fn is not None
            return self.display_fn
        script = self.script
        command = self.command

        def fn(rev: Any, context: Any) -> Any:
            current = tuple(rev) if isinstance(rev, (tuple, list)) else ((rev,) if rev else ())
            dest = self.destination_for(stream, current)
            steps: list[Any]
            if dest is None:
                steps = []
            elif command == "upgrade":
                assert isinstance(dest, str)
                steps = upgrade_steps(script, dest, rev)
            elif command == "downgrade":
                assert isinstance(dest, str)
                steps = downgrade_steps(script, dest, rev)
            else:
                steps = stamp_steps(script, dest if isinstance(dest, tuple) else (dest,), rev)
            # what the location was at (as Alembic just read it), and whether it moves
            self._seen = (format_revision(current), bool(steps))
            return steps

        return fn

    # -- running ------------------------------------------------------------------------------

    def _configure(self, conn: Connection, stream: str, version_schema: str) -> None:
        self.env.configure(
            connection=conn,
            target_metadata=self.tenancy.metadata,
            version_table=VERSION_TABLES[stream],
            version_table_schema=version_schema,
            transaction_per_migration=False,
            fn=self.stream_fn(stream),
            **self.options,
        )

    def _apply(self, conn: Connection, stream: str, version_schema: str) -> tuple[str | None, str | None]:
        """Run the command at one location; its revision before and after. (Alembic reads the
        version table itself; the migration function reports what it read, so that a location
        costs no extra catalog look-up.)"""
        self._configure(conn, stream, version_schema)
        if self.command == "display":
            before = _read_revision(conn, version_schema, stream)
            self.env.run_migrations()
            return before, before
        self._seen = None
        self.env.run_migrations()
        assert self._seen is not None, "Alembic did not call the migration function"
        before, moved = self._seen
        if not moved:
            return before, before
        table = f"{quote_ident(version_schema)}.{quote_ident(VERSION_TABLES[stream])}"
        return before, format_revision(conn.execute(text(f"select version_num from {table}")).scalars())

    def _prepare(self, main: Connection) -> None:
        """On Citus, the settings a transaction that creates and distributes tables needs (see
        :func:`~sqla_tenancy.distribution.prepare_distributed_ddl`), before its first statement."""
        if self.tenancy.config.distributed:
            prepare_distributed_ddl(main)

    def _registry_and_schemas(self, main: Connection) -> None:
        self._prepare(main)
        ensure_registry(self.tenancy.config, main)
        # the schemas Tenancy declares; the stream's revisions create what is in them
        for schema in sorted(self.tenancy.infrastructure_schemas):
            main.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")

    def run_infrastructure(self, main: Connection) -> Outcome:
        """The infrastructure stream on the main database (the ``tenancy`` schema first)."""
        started = time.perf_counter()
        if self.command != "display" and self.tenancy.config.distributed and not main.in_transaction():
            # Citus distributes a table over connections that do not see a schema created in
            # the same, uncommitted transaction: the schemas are committed first.
            with main.begin():
                self._registry_and_schemas(main)
        with deferring_distribution() as pending:
            with _transaction(main):
                if self.command != "display":
                    self._registry_and_schemas(main)
                before, after = self._apply(main, INFRASTRUCTURE, REGISTRY_SCHEMA)
                if self.command != "display":
                    finish_tables(self.tenancy.config, main, self.tenancy.infrastructure_tables())
                    for statement in node_login_ddl(self.tenancy.config):  # Citus: anonymous logins
                        main.exec_driver_sql(statement)
        self._distribute(main, pending)
        return _outcome("infrastructure", "main", INFRASTRUCTURE, before, after, started)

    def run_tenant(self, main: Connection, location: Location, control: Connection | None = None) -> Outcome:
        """The tenant stream at ``location``, under the tenant's provisioning lock (a tenant being
        created or deleted is waited for; one deleted meanwhile is reported ``not_run``).

        ``main`` is a connection to the main database (the location's own for the main database
        and schema tenants); database tenants' locks and registry copies go through ``control``
        (default: ``main``)."""
        started = time.perf_counter()
        tenant = location.tenant
        writes = self.command != "display"
        if location.kind == "schema":
            return self._run_in_main(main, location, started)
        if location.kind == "main":
            with deferring_distribution() as pending:
                outcome = self._run_in_main(main, location, started)
            self._distribute(main, pending)
            return outcome
        registry = control if control is not None else main
        if tenant is not None and writes:
            with tenant_lock(registry, tenant.slug):
                with _transaction(registry):
                    if not _still_there(registry, location):
                        return _gone(location, started)
                return self._run_database(registry, location, started)
        return self._run_database(registry, location, started)

    def _run_in_main(self, main: Connection, location: Location, started: float) -> Outcome:
        """The tenant stream at a location in the main database (its tenant tables, or a schema
        tenant's schema), in one transaction."""
        tenant = location.tenant
        writes = self.command != "display"
        nested = main.in_transaction()
        with _transaction(main):
            if writes and location.kind == "main":
                self._prepare(main)
            placement = self.tenancy.router.placement_of(tenant) if tenant is not None else None
            if tenant is not None and placement is not None:
                # one round trip: the binding, and the lock held until this transaction ends
                lock = locks.xact_lock_sql(locks.tenant_key(tenant.slug))
                main.exec_driver_sql(
                    f"{placement.migration_binding(tenant)}; {lock if writes else 'SELECT 1'}"
                )
                if writes and not _still_there(main, location):
                    return _gone(location, started)
            before, after = self._apply(main, TENANT, location.version_schema)
            if writes:
                if location.kind == "main" and after != before:
                    finish_tables(self.tenancy.config, main, self.tenancy.tenant_tables())
                if tenant is not None and placement is not None and after != before:
                    placement.after_migration(main, tenant, created=before is None)
                update_registry_copy(main, location, after)
            if tenant is not None and nested:  # a caller's outer transaction goes on unbound
                main.exec_driver_sql(UNBIND)
        return _outcome(location.name, location.kind, TENANT, before, after, started)

    def _distribute(self, main: Connection, pending: list[tuple[str, str | None]]) -> None:
        """The distributions the migrations asked for, in a transaction of their own (see
        :func:`~sqla_tenancy.distribution.deferring_distribution`); inside a caller's transaction,
        in it."""
        if not pending:
            return
        nested = main.in_transaction()
        with _transaction(main):
            if not nested:
                self._prepare(main)
            for table, column in pending:
                distribute_table(main, table, column)

    def _run_database(self, registry: Connection, location: Location, started: float) -> Outcome:
        if location.kind == "template" and self.command != "display":
            # Provisioning clones the template under this lock: never while we are connected.
            maintenance = self.tenancy.server_admin_url(location.server).database or "postgres"
            key = locks.template_key(location.database or "")
            with self._connect(location.server, maintenance) as guard, locks.session_lock(guard, key):
                return self._run_database_locked(registry, location, started)
        return self._run_database_locked(registry, location, started)

    def _run_database_locked(self, registry: Connection, location: Location, started: float) -> Outcome:
        assert location.database is not None
        tenant = location.tenant
        placement = self.tenancy.router.placement_of(tenant) if tenant is not None else None
        with self._connect(location.server, location.database) as conn, _transaction(conn):
            if tenant is not None and placement is not None:
                conn.exec_driver_sql(placement.migration_binding(tenant))
            before, after = self._apply(conn, TENANT, location.version_schema)
            if self.command != "display" and after != before and tenant is not None and placement is not None:
                placement.after_migration(conn, tenant, created=before is None)
        if self.command != "display" and location.kind == "database":
            with _transaction(registry):
                update_registry_copy(registry, location, after)
        return _outcome(location.name, location.kind, TENANT, before, after, started)


def _read_revision(conn: Connection, schema: str, stream: str) -> str | None:
    """The location's revision, read directly (``to_regclass`` rather than a catalog reflection:
    it is on the path of every location of a fleet run)."""
    table = f"{quote_ident(schema)}.{quote_ident(VERSION_TABLES[stream])}"
    if conn.execute(text("select to_regclass(:t)"), {"t": table}).scalar() is None:
        return None
    return format_revision(conn.execute(text(f"select version_num from {table}")).scalars())


def _still_there(conn: Connection, location: Location) -> bool:
    """The tenant is still registered and migratable (read under its lock)."""
    tenant = location.tenant
    assert tenant is not None
    row = TenantStore().get(conn, tenant.id)
    return row is not None and row.status in MIGRATED_STATUSES


def _gone(location: Location, started: float) -> Outcome:
    return Outcome(
        location.name,
        location.kind,
        TENANT,
        location.revision,
        None,
        time.perf_counter() - started,
        "not_run",
        "deleted during the run",
    )


@contextmanager
def _transaction(conn: Connection) -> Iterator[None]:
    """A transaction on ``conn``; a savepoint when the caller's connection is already in one (a
    Connection handed over in ``config.attributes``, whose transaction is the caller's)."""
    if conn.in_transaction():
        with conn.begin_nested():
            yield
    else:
        with conn.begin():
            yield


def _outcome(
    name: str, kind: str, stream: str, before: str | None, after: str | None, started: float
) -> Outcome:
    return Outcome(
        name,
        kind,
        stream,
        before,
        after,
        time.perf_counter() - started,
        "upgraded" if after != before else "unchanged",
    )
