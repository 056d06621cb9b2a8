"""The tenant registry: the ``tenancy.tenants`` table, the :class:`Tenant` record, and a
per-process cache that every other process's changes invalidate through ``LISTEN/NOTIFY``.

One tenant per name: a CHECK constraint holds every slug to the slug pattern and length, matched
whole, so no statement (this library's, a migration's, a DBA's) can register ``"acme\n"`` or
``"ACME"`` beside ``acme``. A tenant's access key is stored as its SHA-256 hash only
(``access_key_hash``); the application role may read every column but that one, and verifies
keys through ``tenancy.access_key_tenant(key)`` (see :mod:`sqla_tenancy.checkpoint`).

A trigger on the table sends ``NOTIFY sqla_tenancy_registry, '<tenant id>'`` on every insert,
update and delete, whoever makes the change (this library, a migration, a DBA in psql). Each
process keeps one listening connection on a daemon thread; entries also expire after a bounded
TTL, which covers a listener that lost its connection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Index,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.engine import URL

from .errors import TenantNotFound
from .identifiers import MAX_SLUG_LENGTH, SLUG_PATTERN

__all__ = [
    "ACCESS_KEY_FUNCTION",
    "APPLICATION_COLUMNS",
    "MOVE_GUARD_PREFIX",
    "MOVE_JOURNAL_KEY",
    "MOVE_SOURCE_KEY",
    "NOTIFY_CHANNEL",
    "REGISTRY_SCHEMA",
    "SLUG_CHECK",
    "STATUSES",
    "PLACEMENTS",
    "STRATEGIES",
    "Registry",
    "Tenant",
    "TenantStore",
    "access_key_hash",
    "access_key_hash_sql",
    "registry_metadata",
    "row_to_tenant",
    "tenants_table",
]

log = logging.getLogger(__name__)

REGISTRY_SCHEMA = "tenancy"
NOTIFY_CHANNEL = "sqla_tenancy_registry"
#: Keys of a tenant's location while it is moved (see :mod:`sqla_tenancy.move`): the target's
#: journaled objects, and a source database still to remove once the switch committed.
MOVE_JOURNAL_KEY = "move_journal"
MOVE_SOURCE_KEY = "move_source"
#: A move's read-only guard: the function ``tenancy.tenancy_moving_<tenant id hex>()``, made where
#: the tenant's rows are (the main database, or the tenant's own), which its RESTRICTIVE policies call.
MOVE_GUARD_PREFIX = "tenancy_moving_"
#: The placements' stored names (the ``strategy`` column's values).
PLACEMENTS = ("shared", "schema", "database")
#: The former name of :data:`PLACEMENTS`.
STRATEGIES = PLACEMENTS
#: ``pending``: a database tenant provisioned ahead, waiting in the pool for ``create_tenant``
#: to claim it (see :mod:`sqla_tenancy.pool`).
STATUSES = ("provisioning", "active", "suspended", "deleting", "pending")

#: The slug rule as SQL, for the registry's CHECK constraint: PostgreSQL's ``^...$`` anchors the
#: whole string (no newline may follow), and the pattern is written in the syntax both Python's
#: ``re`` and PostgreSQL's regular expressions read alike. Reserved slugs are left to
#: :func:`~sqla_tenancy.identifiers.validate_slug` (the default tenant's is one of them).
SLUG_CHECK = f"slug ~ '^{SLUG_PATTERN.pattern}$' AND char_length(slug) <= {MAX_SLUG_LENGTH}"
assert "'" not in SLUG_PATTERN.pattern and ":" not in SLUG_PATTERN.pattern

#: ``<schema>.access_key_tenant(key uuid) -> uuid``: the id of the tenant whose access key is
#: ``key``, or NULL. ``SECURITY DEFINER`` (owned by the admin role), so that the application role
#: can verify a key without being able to read any key's hash.
ACCESS_KEY_FUNCTION = f"{REGISTRY_SCHEMA}.access_key_tenant"


def access_key_hash_sql(key: str) -> str:
    """The SQL expression of the stored hash of the access key ``key`` (a SQL ``uuid``
    expression): SHA-256 of its 16 bytes. Keys are random, so no salt is needed."""
    return f"pg_catalog.sha256(pg_catalog.uuid_send({key}))"


def access_key_hash(key: uuid.UUID) -> bytes:
    """:func:`access_key_hash_sql`, computed here: what is stored for ``key``. Issuing a key sends
    only this, so the key itself never reaches the server (nor its logs)."""
    return hashlib.sha256(key.bytes).digest()


registry_metadata = MetaData(schema=REGISTRY_SCHEMA)

tenants_table = Table(
    "tenants",
    registry_metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=func.gen_random_uuid()),
    Column("slug", Text, nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("strategy", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="active"),
    Column("is_default", Boolean, nullable=False, server_default="false"),
    Column("location", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # SHA-256 of the tenant's access key (access_key_hash_sql); NULL until a key is issued. The
    # key itself is never stored: it is shown once, by the call that issues it.
    Column("access_key_hash", LargeBinary, nullable=True),
    # A copy of the tenant stream's revision at the tenant's location (comma-separated heads), so
    # that one query tells which tenants are behind; the location's own version table is the truth.
    Column("revision", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"strategy in {PLACEMENTS!r}", name="tenants_strategy_check"),
    CheckConstraint(f"status in {STATUSES!r}", name="tenants_status_check"),
    CheckConstraint(SLUG_CHECK, name="tenants_slug_check"),
    Index("tenants_access_key_hash_key", "access_key_hash", unique=True),
)

#: What the application role may read of ``tenancy.tenants``: every column but the key hash.
APPLICATION_COLUMNS = tuple(c.name for c in tenants_table.columns if c.name != "access_key_hash")


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant as the registry knows it. Immutable: changes go through :class:`Tenancy`."""

    id: uuid.UUID
    slug: str
    name: str
    strategy: str
    status: str
    created_at: datetime
    is_default: bool = False
    location: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: the tenant migration stream's revision at the tenant's location (registry copy), if known
    revision: str | None = field(default=None, compare=False, hash=False)

    @property
    def placement(self) -> str:
        """The tenant's placement: ``"shared"``, ``"schema"`` or ``"database"`` (stored, for
        compatibility, in the registry's ``strategy`` column, and readable as ``strategy``)."""
        return self.strategy

    @property
    def is_active(self) -> bool:
        """True when queries may run for the tenant."""
        return self.status == "active"


#: The columns a :class:`Tenant` is read from, in :func:`row_to_tenant`'s order.
COLUMNS = "id, slug, name, strategy, status, created_at, is_default, location, revision"


def row_to_tenant(row: Sequence[Any]) -> Tenant:
    """The :class:`Tenant` of a registry row read as :data:`COLUMNS` (the one row mapping)."""
    return Tenant(
        id=row[0],
        slug=row[1],
        name=row[2],
        strategy=row[3],
        status=row[4],
        created_at=row[5],
        is_default=row[6],
        location=dict(row[7] or {}),
        revision=row[8],
    )


_TABLE = f"{REGISTRY_SCHEMA}.tenants"


class TenantStore:
    """Every statement that writes ``tenancy.tenants``, and its reads on a SQLAlchemy connection.

    The one place that knows the table's columns besides its DDL: lifecycle, installer,
    checkpoint, placements and the migration runner go through it. Each method runs on the
    connection it is given, inside that connection's transaction; it holds no state.
    """

    def get(self, conn: Connection, ref: str | uuid.UUID) -> Tenant | None:
        """The tenant with this id (a UUID) or slug (a str), whatever its status."""
        column = "id" if isinstance(ref, uuid.UUID) else "slug"
        row = conn.execute(
            text(f"select {COLUMNS} from {_TABLE} where {column} = :ref"), {"ref": ref}
        ).first()
        return row_to_tenant(row) if row is not None else None

    def list(self, conn: Connection, *, statuses: Iterable[str] | None = None) -> list[Tenant]:
        """Every tenant (with one of ``statuses``), oldest first."""
        where = "" if statuses is None else "where status = any(:statuses) "
        rows = conn.execute(
            text(f"select {COLUMNS} from {_TABLE} {where}order by created_at, slug"),
            {} if statuses is None else {"statuses": list(statuses)},
        ).all()
        return [row_to_tenant(r) for r in rows]

    def insert(self, conn: Connection, tenant: Tenant) -> Tenant:
        """Register ``tenant`` as it is (its id, status and location); returns it with the
        server's ``created_at``."""
        created_at = conn.execute(
            text(
                f"insert into {_TABLE} (id, slug, name, strategy, status, location) "
                "values (:id, :slug, :name, :strategy, :status, :location) returning created_at"
            ),
            {
                "id": tenant.id,
                "slug": tenant.slug,
                "name": tenant.name,
                "strategy": tenant.strategy,
                "status": tenant.status,
                "location": json.dumps(tenant.location),
            },
        ).scalar_one()
        return dataclasses.replace(tenant, created_at=created_at)

    def ensure_default(self, conn: Connection, slug: str) -> None:
        """Register the default tenant (shared, active) unless it is there."""
        conn.execute(
            text(
                f"insert into {_TABLE} (slug, name, strategy, status, is_default) "
                "values (:slug, :slug, 'shared', 'active', true) on conflict (slug) do nothing"
            ),
            {"slug": slug},
        )

    def activate(
        self, conn: Connection, tenant: Tenant, location: dict[str, Any], revision: str | None
    ) -> Tenant | None:
        """Mark a tenant that is still ``provisioning`` active, with its final location; ``None``
        when its row changed meanwhile (deleted by another process)."""
        found = conn.execute(
            text(
                f"update {_TABLE} set status = 'active', location = :location, revision = :revision "
                "where id = :id and status = 'provisioning' returning id"
            ),
            {"location": json.dumps(location), "id": tenant.id, "revision": revision},
        ).first()
        if found is None:
            return None
        return dataclasses.replace(tenant, status="active", location=location, revision=revision)

    def journal(
        self,
        conn: Connection,
        tenant_id: uuid.UUID,
        key: str,
        entries: Sequence[Any],
        *,
        status: str = "provisioning",
    ) -> bool:
        """Append ``entries`` to the list ``location[key]`` of a tenant being provisioned (or in
        ``status``: a move journals its target in the active row); False when the row is gone or
        no longer in that status."""
        result = conn.execute(
            text(
                f"update {_TABLE} set location = jsonb_set(location, array[cast(:key as text)], "
                "coalesce(location -> cast(:key as text), '[]'::jsonb) || cast(:entries as jsonb)) "
                "where id = :id and status = :status"
            ),
            {"key": key, "entries": json.dumps(list(entries)), "id": tenant_id, "status": status},
        )
        return result.rowcount == 1

    def set_status(self, conn: Connection, tenant_id: uuid.UUID, status: str) -> None:
        conn.execute(
            text(f"update {_TABLE} set status = :status where id = :id"), {"status": status, "id": tenant_id}
        )

    def update(self, conn: Connection, ref: str | uuid.UUID, **values: Any) -> uuid.UUID | None:
        """Change ``name`` or ``status`` of a tenant other than the default one; its id, or
        ``None`` when no such tenant (or it is the default tenant)."""
        unknown = set(values) - {"name", "status"}
        if unknown or not values:
            raise ValueError(f"a tenant's name or status can be updated, not {sorted(unknown) or 'nothing'}")
        assignments = ", ".join(f"{column} = :{column}" for column in sorted(values))
        column = "id" if isinstance(ref, uuid.UUID) else "slug"
        found = conn.execute(
            text(
                f"update {_TABLE} set {assignments}, updated_at = now() "
                f"where {column} = :ref and not is_default returning id"
            ),
            {"ref": ref, **values},
        ).scalar()
        return found if isinstance(found, uuid.UUID) else None

    def move(
        self,
        conn: Connection,
        tenant: Tenant,
        *,
        placement: str,
        location: dict[str, Any],
        revision: str | None,
    ) -> bool:
        """Switch an active tenant to another placement (:func:`sqla_tenancy.move.move_tenant`);
        False when the row is no longer the active one of ``tenant``'s placement."""
        result = conn.execute(
            text(
                f"update {_TABLE} set strategy = :placement, location = cast(:location as jsonb), "
                "revision = :revision, updated_at = now() "
                "where id = :id and strategy = :source and status = 'active' and not is_default"
            ),
            {
                "placement": placement,
                "location": json.dumps(location),
                "revision": revision,
                "id": tenant.id,
                "source": tenant.strategy,
            },
        )
        return result.rowcount == 1

    def drop_location_key(self, conn: Connection, tenant_id: uuid.UUID, key: str) -> None:
        """Remove ``location[key]`` of a tenant's row (a finished move's journal or leftover)."""
        conn.execute(
            text(f"update {_TABLE} set location = location - cast(:key as text) where id = :id"),
            {"key": key, "id": tenant_id},
        )

    def claim_pending(self, conn: Connection, *, server: str) -> Tenant | None:
        """Lock the oldest ``pending`` database tenant on ``server`` for this transaction
        (``SKIP LOCKED``: concurrent claims take different ones); None when the pool is empty."""
        row = conn.execute(
            text(
                f"select {COLUMNS} from {_TABLE} where status = 'pending' and strategy = 'database' "
                "and coalesce(location ->> 'server', 'main') = :server "
                "order by created_at, id limit 1 for update skip locked"
            ),
            {"server": server},
        ).first()
        return row_to_tenant(row) if row is not None else None

    def claimed(
        self, conn: Connection, tenant: Tenant, *, slug: str, name: str, location: dict[str, Any]
    ) -> Tenant:
        """The pending ``tenant`` becomes the active tenant ``slug`` (in the claiming transaction)."""
        row = conn.execute(
            text(
                f"update {_TABLE} set slug = :slug, name = :name, status = 'active', "
                "location = cast(:location as jsonb), created_at = now(), updated_at = now() "
                f"where id = :id and status = 'pending' returning {COLUMNS}"
            ),
            {"slug": slug, "name": name, "location": json.dumps(location), "id": tenant.id},
        ).first()
        if row is None:
            raise LookupError(f"pending tenant {tenant.id} is gone")
        return row_to_tenant(row)

    def delete(self, conn: Connection, tenant_id: uuid.UUID) -> None:
        conn.execute(text(f"delete from {_TABLE} where id = :id"), {"id": tenant_id})

    def set_revision(
        self, conn: Connection, revision: str | None, *, ids: Iterable[uuid.UUID] | None = None
    ) -> None:
        """The registry copy of the tenant stream's revision: for the tenants ``ids``, or (without
        ``ids``) for every shared tenant, whose location is the main database."""
        if ids is None:
            conn.execute(
                text(f"update {_TABLE} set revision = :r where strategy = 'shared'"), {"r": revision}
            )
        else:
            conn.execute(
                text(f"update {_TABLE} set revision = :r where id = any(:ids)"),
                {"r": revision, "ids": list(ids)},
            )

    def set_access_key_hash(self, conn: Connection, ref: str | uuid.UUID, digest: bytes | None) -> bool:
        """Store (or, with ``None``, clear) a tenant's access key hash; False when no such tenant."""
        column = "id" if isinstance(ref, uuid.UUID) else "slug"
        found = conn.execute(
            text(
                f"update {_TABLE} set access_key_hash = :hash, updated_at = now() "
                f"where {column} = :ref returning id"
            ),
            {"hash": digest, "ref": ref},
        ).first()
        return found is not None

    def access_key_owner(self, conn: Connection, key: uuid.UUID) -> tuple[uuid.UUID, str] | None:
        """The (id, slug) of the tenant whose access key is ``key``, through the registry's
        ``access_key_tenant()`` function: the comparison happens on the stored hash."""
        row = conn.execute(
            text(f"select id, slug from {_TABLE} where id = {ACCESS_KEY_FUNCTION}(cast(:key as uuid))"),
            {"key": key},
        ).first()
        return (row[0], row[1]) if row is not None else None


def conninfo_kwargs(url: URL) -> dict[str, Any]:
    """psycopg connection keywords for a SQLAlchemy URL (password and query options included)."""
    kwargs: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    kwargs["application_name"] = "sqla-tenancy-registry"  # recognisable in pg_stat_activity
    kwargs.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    return {k: v for k, v in kwargs.items() if v is not None}


_REGISTRIES: weakref.WeakSet[Registry] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for registry in list(_REGISTRIES):
        registry._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class Registry:
    """Cached look-ups of :class:`Tenant` records for one database, shared by threads.

    ``ttl`` bounds how long an entry is trusted without a notification; ``listen`` starts the
    notification listener on the first look-up.
    """

    def __init__(self, url: URL, *, ttl: float = 5.0, listen: bool = True) -> None:
        self._url = url
        self._ttl = ttl
        self._listen_enabled = listen
        self._lock = threading.Lock()
        self._entries: dict[object, tuple[Tenant, float]] = {}
        self._generation = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._conn_lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._subscribers: list[Callable[[uuid.UUID | None], None]] = []
        _REGISTRIES.add(self)

    # -- look-ups ---------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Changes whenever any cached entry is invalidated."""
        return self._generation

    def get(self, ref: str | uuid.UUID) -> Tenant:
        """The tenant with this slug or id; raises :class:`TenantNotFound`."""
        return self.get_entry(ref)[0]

    def get_entry(self, ref: str | uuid.UUID) -> tuple[Tenant, float]:
        """The tenant and the ``time.monotonic()`` until which the cache trusts it."""
        entry = self._entries.get(ref)
        now = time.monotonic()
        if entry is not None and entry[1] > now:
            return entry
        if self._listen_enabled and self._listener is None:
            self._start_listener()
        generation = self._generation
        tenant = self._fetch_one(ref)
        if tenant is None:
            raise TenantNotFound(ref)
        expires = now + self._ttl
        with self._lock:
            if generation == self._generation:
                self._entries[tenant.slug] = (tenant, expires)
                self._entries[tenant.id] = (tenant, expires)
            else:
                expires = now  # raced with an invalidation: do not let callers keep it
        return tenant, expires

    def all(self) -> list[Tenant]:
        """Every tenant, ordered by creation (not cached)."""
        rows = self._query(f"select {COLUMNS} from {_TABLE} order by created_at, slug", ())
        return [row_to_tenant(r) for r in rows]

    def role_attributes(self) -> tuple[bool, bool]:
        """Whether the role the registry connects as (the application role) is a superuser, and
        whether it bypasses row-level security."""
        superuser, bypass = self._query(
            "select rolsuper, rolbypassrls from pg_roles where rolname = current_user", ()
        )[0]
        return bool(superuser), bool(bypass)

    def admits_tenants(self) -> bool:
        """Whether the main database has ``tenancy.admit_tenant(uuid)`` (made by ``install()``)."""
        (found,) = self._query("select to_regprocedure('tenancy.admit_tenant(uuid)') is not null", ())[0]
        return bool(found)

    def admits_placements(self) -> bool:
        """Whether it has ``tenancy.admit_tenant(uuid, text)``, which checks the placement too
        (made by ``install()`` since moves between placements exist)."""
        (found,) = self._query("select to_regprocedure('tenancy.admit_tenant(uuid, text)') is not null", ())[
            0
        ]
        return bool(found)

    def admits_by_call(self) -> bool:
        """Whether it has the procedure ``tenancy.admit(uuid, text)`` (made by ``install()`` since
        bindings ``CALL`` it: see :func:`~sqla_tenancy.binding.admit_statement`)."""
        (found,) = self._query("select to_regprocedure('tenancy.admit(uuid, text)') is not null", ())[0]
        return bool(found)

    def invalidate(self, keys: Iterable[object] | None = None) -> None:
        """Forget cached entries (all of them when ``keys`` is None)."""
        with self._lock:
            self._generation += 1
            if keys is None:
                self._entries.clear()
                return
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    self._entries.pop(entry[0].slug, None)
                    self._entries.pop(entry[0].id, None)

    def _fetch_one(self, ref: str | uuid.UUID) -> Tenant | None:
        if isinstance(ref, uuid.UUID):
            sql = f"select {COLUMNS} from {_TABLE} where id = %s"
        else:
            sql = f"select {COLUMNS} from {_TABLE} where slug = %s"
        rows = self._query(sql, (ref,))
        return row_to_tenant(rows[0]) if rows else None

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        # A dedicated autocommit connection: registry reads must not go through the tenant-bound
        # engine (whose transaction begin itself needs the registry).
        with self._conn_lock:
            for attempt in (1, 2):
                conn = self._conn
                if conn is None or conn.closed:
                    # No server-side prepared statements: they would not survive a transaction-mode
                    # pooler between look-ups.
                    conn = self._conn = psycopg.connect(
                        autocommit=True, prepare_threshold=None, **conninfo_kwargs(self._url)
                    )
                try:
                    return conn.execute(sql, params).fetchall()
                except (psycopg.OperationalError, psycopg.InternalError):
                    self._conn = None
                    conn.close()
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    # -- notifications ----------------------------------------------------------------------

    def _after_fork(self) -> None:
        # Threads and sockets do not survive a fork: the child starts afresh (and must not use
        # the parent's connection, whose socket it shares).
        self._entries = {}
        self._generation += 1
        self._conn = None
        self._conn_lock = threading.Lock()
        self._lock = threading.Lock()
        self._listener = None
        self._stop = threading.Event()
        self._listening = threading.Event()

    def _start_listener(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            self._listener = threading.Thread(
                target=self._listen_loop, name="sqla-tenancy-registry-listener", daemon=True
            )
            self._listener.start()
        # Give the listener a moment so that changes made right after the first look-up are seen.
        self._listening.wait(timeout=2.0)

    def _listen_loop(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(autocommit=True, **conninfo_kwargs(self._url)) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    # Anything may have changed while we were not listening.
                    self.invalidate()
                    self._listening.set()
                    self._publish(None)
                    backoff = 0.1
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._on_notify(note.payload)
            except Exception as exc:  # noqa: BLE001 - the listener must survive anything
                self._listening.clear()
                if self._stop.is_set():
                    return
                log.warning("registry listener lost its connection (%s); retrying", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def subscribe(self, callback: Callable[[uuid.UUID | None], None]) -> None:
        """Call ``callback`` on the listener thread after each notification has invalidated the
        cache: with the tenant's id, or ``None`` when anything may have changed (the listener
        (re)connected, or a payload named no tenant). Errors it raises are logged, not raised."""
        self._subscribers.append(callback)

    def _publish(self, key: uuid.UUID | None) -> None:
        for callback in list(self._subscribers):
            try:
                callback(key)
            except Exception:
                log.exception("a registry subscriber failed on a change of %s", key or "the registry")

    def _on_notify(self, payload: str) -> None:
        try:
            key = uuid.UUID(payload)
        except ValueError:
            self.invalidate()
            self._publish(None)
            return
        self.invalidate([key])
        self._publish(key)

    @property
    def listening(self) -> bool:
        """True while the notification listener holds a live connection."""
        return self._listening.is_set()

    def close(self) -> None:
        """Stop the listener and close the look-up connection."""
        self._stop.set()
        if self._listener is not None and self._listener is not threading.current_thread():
            self._listener.join(timeout=2.0)
        self._listener = None
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self.invalidate()
