"""The :class:`Tenancy` facade: what an application constructs once and uses everywhere.

It builds the layers below it (configuration, engines, registry, placements, router) and hands
each the collaborators it needs; every public method is a short delegation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from sqlalchemy import Connection, Engine, MetaData, Table, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import sessionmaker as orm_sessionmaker

from .audit import attach_platform_reason
from .config import TenancyConfig, plain_url
from .context import set_active_resolver
from .distribution import tenant_filter
from .engines import EngineCache, Engines
from .errors import ConfigurationError, TenantNotFound, UnsupportedOperation
from .events import EventName, Events, Hook, TenantEvent
from .placements import DatabasePlacement, Placement, SchemaPlacement, SharedPlacement
from .registry import Registry, Tenant, TenantStore
from .routing import Router, lookup_key
from .services import Services
from .session import TenantSession
from .steps import Steps

if TYPE_CHECKING:
    from sqlalchemy.sql import Executable

    from .audit import AuditEntry
    from .distribution import TenantNode
    from .doctor import Finding
    from .fleet import TenantResult, TenantRow
    from .sandbox import StatementResult

__all__ = ["Tenancy", "active_tenancy"]

log = logging.getLogger(__name__)

_active: weakref.ref[Tenancy] | None = None


def active_tenancy() -> Tenancy | None:
    """The most recently created :class:`Tenancy` of this process, if it is still alive."""
    return _active() if _active is not None else None


class Tenancy:
    """Multi-tenancy for one application database.

    :param url: the application role's URL. That role must not be a superuser, must not have
        BYPASSRLS and should not own the tenant tables; it is checked on first use.
    :param metadata: the application's ``MetaData``. Tables whose schema is in
        ``infrastructure_schemas`` are infrastructure (kept once, in the main database); every
        other table is a tenant table.
    :param infrastructure_schemas: schemas whose tables are infrastructure (kept once, in the main
        database); tables elsewhere are tenant tables.
    :param admin_url: the role that provisions tenants, runs migrations and serves
        :func:`platform_context` (typically the owner of the tables, with BYPASSRLS).
        Defaults to ``url``.
    :param default_tenant: the slug of the tenant that serves queries made with no tenant in
        context (``None``: such queries raise :class:`TenantRequired`).
    :param allow_bypassrls: accept an application role that bypasses RLS (development only).
    :param engine_options: keyword arguments for the application engine (pool size, echo, ...).
    :param registry_ttl: seconds a cached registry entry is trusted without a notification.
    :param name_prefix: the prefix of every schema, database and role name derived from a slug
        (``tenant`` gives ``tenant_acme``, ``tenant_acme_app``). Roles and databases are
        cluster-wide, so applications sharing a cluster need distinct prefixes.
    :param servers: other PostgreSQL servers database tenants may live on, by name: the URL of a
        role there that may create databases and roles. ``"main"`` is the main database's server.
    :param secret_key: the key per-tenant role passwords are derived from (HMAC-SHA256; the
        passwords are stored nowhere). Needed by the database placement; defaults to
        ``$SQLA_TENANCY_SECRET_KEY``. Keep it secret and stable: changing it locks tenants out.
    :param tenant_pool_size: pool size of each database tenant's engine (``tenant_max_overflow``
        more under load).
    :param max_tenant_engines: how many database tenants' engines a process keeps (the least
        recently used one makes room for a tenant asked for more often lately).
    :param max_tenant_connections: a process-wide budget of connections to tenant databases.
    :param create_database_strategy: ``"file_copy"`` or ``"wal_log"`` for the ``STRATEGY`` of
        ``CREATE DATABASE`` (PostgreSQL 15+; default: the server's, ``wal_log``). ``file_copy``
        copies the small template several times faster but forces two checkpoints per tenant,
        which a busy server with large shared buffers feels; measure on yours.
    :param registry_url: where registry look-ups and the LISTEN connection go (default ``url``).
        Behind a transaction-mode pooler, give a direct URL of the application role here: LISTEN
        needs a session of its own, and look-ups made while the pooler's server connections are
        all held by waiting transactions would wait forever.
    :param migrations: the project's ``alembic.ini`` (a path or an Alembic ``Config``) when its
        schema is managed by the Alembic extension (:mod:`alembic_ext`): tenants created from the
        models are then stamped with the tenant stream's head, so they are born at head and the
        fleet runner leaves them alone.
    :param fdw_host: the host (name or address) by which tenant databases' ``postgres_fdw``
        reaches the main database, as seen from their servers (default: ``admin_url``'s host).
        Used when a tenant database's foreign server is created; existing ones keep theirs.
    :param fdw_port: the port that goes with it (default: ``admin_url``'s port).
    :param registry_listen: keep a LISTEN connection so that registry changes made by other
        processes arrive within a second; with False only ``registry_ttl`` bounds staleness.
    :param distributed: the main database is a Citus coordinator: ``install()`` distributes the
        tenant tables by ``tenant_id`` (colocated) and makes the other infrastructure tables
        reference tables, and every binding propagates the tenant to the workers. See
        :mod:`sqla_tenancy.distribution` and ``docs/scale-out.md``.
    :param pending_tenants: keep this many database tenants provisioned ahead on the main
        server, ``{"database": 5}``: ``create_tenant(..., placement="database")`` claims one in
        milliseconds, and this process provisions a replacement in a background thread
        afterwards (see :meth:`refill_pool` and :mod:`sqla_tenancy.pool`). Default: none.
    :param tenant_scram_iterations: the PBKDF2 iteration count of the SCRAM verifiers of the login
        roles created for database tenants (default 4096, PostgreSQL's). The client computes
        that many HMACs at every new connection: about 2 ms. The derived
        passwords are 256-bit keys, which no iteration count makes easier or harder to guess;
        the iterations still slow down guessing a weak ``secret_key`` from a stolen verifier:
        lower them only with a random key (see ``docs/operations.md``, many database tenants).
        Applies to roles created (or claimed from the pool) afterwards;
        :meth:`rehash_role_passwords` brings existing ones to it.
    :param tenant_poolers: per server name (``"main"`` included), the address of a pooler such as
        PgBouncer, as ``"postgresql://host:port"``, that database tenants' engines connect through
        instead of the server itself. Each tenant still logs in as its own role to its own
        database; the pooler must authenticate those roles (PgBouncer: their SCRAM verifiers in
        ``auth_file``, or ``auth_query``). Provisioning, migrations, ``run_sql`` and postgres_fdw
        keep connecting directly.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        metadata: MetaData,
        admin_url: str | URL | None = None,
        infrastructure_schemas: Iterable[str] = (),
        default_tenant: str | None = "default",
        allow_bypassrls: bool = False,
        engine_options: dict[str, Any] | None = None,
        registry_ttl: float = 5.0,
        registry_listen: bool = True,
        registry_url: str | URL | None = None,
        name_prefix: str = "tenant",
        servers: Mapping[str, str | URL] | None = None,
        secret_key: str | bytes | None = None,
        tenant_pool_size: int = 2,
        tenant_max_overflow: int = 2,
        max_tenant_engines: int = 50,
        max_tenant_connections: int | None = None,
        create_database_strategy: str | None = None,
        migrations: str | os.PathLike[str] | Any | None = None,
        fdw_host: str | None = None,
        fdw_port: int | None = None,
        distributed: bool = False,
        pending_tenants: Mapping[str, int] | None = None,
        tenant_scram_iterations: int = 4096,
        tenant_poolers: Mapping[str, str | URL] | None = None,
    ) -> None:
        global _active
        #: everything given here, validated (see :class:`~sqla_tenancy.config.TenancyConfig`)
        self.config = config = TenancyConfig.create(
            url,
            metadata=metadata,
            admin_url=admin_url,
            infrastructure_schemas=infrastructure_schemas,
            default_tenant=default_tenant,
            allow_bypassrls=allow_bypassrls,
            engine_options=engine_options,
            registry_ttl=registry_ttl,
            registry_listen=registry_listen,
            registry_url=registry_url,
            name_prefix=name_prefix,
            servers=servers,
            secret_key=secret_key,
            tenant_pool_size=tenant_pool_size,
            tenant_max_overflow=tenant_max_overflow,
            max_tenant_engines=max_tenant_engines,
            max_tenant_connections=max_tenant_connections,
            create_database_strategy=create_database_strategy,
            migrations=migrations,
            fdw_host=fdw_host,
            fdw_port=fdw_port,
            distributed=distributed,
            pending_tenants=pending_tenants,
            tenant_scram_iterations=tenant_scram_iterations,
            tenant_poolers=tenant_poolers,
        )
        self.registry = Registry(config.registry_url, ttl=config.registry_ttl, listen=config.registry_listen)
        self.engines = engines = Engines(config)
        attach_platform_reason(engines)  # platform_context's reason reaches the audit triggers
        placements: dict[str, Placement] = {}
        self.router = Router(config, self.registry, engines, placements)
        engines.bind(self.router.binding, self.router.current_tenant_id)
        # another process suspended or deleted a tenant: drop its pooled connections here too
        self.registry.subscribe(self.router.release_stopped)
        self._steps = steps = Steps()
        #: lifecycle callbacks (see :meth:`on` and :mod:`sqla_tenancy.events`)
        self.events = Events()
        steps.observer = self.events.step
        placements.update(
            shared=SharedPlacement(config, engines, steps),
            schema=SchemaPlacement(config, engines, steps),
            database=DatabasePlacement(config, engines, steps),
        )
        #: the only writer of the registry table (see :class:`~sqla_tenancy.registry.TenantStore`)
        self.store = TenantStore()
        #: the parts above, as the operations (lifecycle, installer, export, migrations) use them
        self.services = Services(config, engines, self.registry, self.store, self.router, placements, steps)
        self._session_class: type[TenantSession] = TenantSession
        if config.distributed:
            # ORM statements carry the tenant filter Citus routes by (see sqla_tenancy.distribution)
            self._session_class = type("DistributedTenantSession", (TenantSession,), {})
            event.listen(self._session_class, "do_orm_execute", tenant_filter(self._filter_tenant_id))
        # the background refill of the pending tenants' pool (see _refill_soon)
        self._refilling = threading.Lock()
        self._refill_thread: threading.Thread | None = None
        self._closing = threading.Event()
        set_active_resolver(self.router)
        _active = weakref.ref(self)

    def _filter_tenant_id(self) -> uuid.UUID | None:
        tenant = self.router.current().tenant  # None inside platform_context()
        return tenant.id if tenant is not None else None

    # -- configuration, as attributes (read-only) --------------------------------------------

    @property
    def url(self) -> URL:
        return self.config.url

    @property
    def admin_url(self) -> URL:
        return self.config.admin_url

    @property
    def metadata(self) -> MetaData:
        return self.config.metadata

    @property
    def infrastructure_schemas(self) -> frozenset[str]:
        return self.config.infrastructure_schemas

    @property
    def default_tenant(self) -> str | None:
        return self.config.default_tenant

    @property
    def allow_bypassrls(self) -> bool:
        return self.config.allow_bypassrls

    @property
    def name_prefix(self) -> str:
        return self.config.name_prefix

    @property
    def servers(self) -> Mapping[str, URL]:
        return self.config.servers

    @property
    def create_database_strategy(self) -> str | None:
        return self.config.create_database_strategy

    @property
    def migrations(self) -> Any:
        """The project's Alembic configuration (``None``: the schema is not managed by migrations).
        May be attached after construction (the Alembic extension does)."""
        return self.config.migrations.value

    @migrations.setter
    def migrations(self, value: Any) -> None:
        self.config.migrations.attach(value)

    def tenant_tables(self) -> list[Table]:
        """The application's tenant tables (every table outside the infrastructure schemas)."""
        return self.config.tenant_tables()

    def infrastructure_tables(self) -> list[Table]:
        """The tables in the infrastructure schemas."""
        return self.config.infrastructure_tables()

    def server_admin_url(self, server: str) -> URL:
        """The admin URL of a server database tenants can be placed on (``"main"`` included)."""
        return self.config.server_admin_url(server)

    def tenant_heads(self) -> tuple[str, ...] | None:
        """The tenant stream's head revisions of ``migrations`` (None when not configured)."""
        return self.config.tenant_heads()

    def secret(self) -> bytes:
        """The key tenant role passwords are derived from."""
        return self.config.secret()

    # -- engines ----------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The application role's engine, bound per transaction (the main database)."""
        return self.engines.app

    @property
    def async_engine(self) -> AsyncEngine:
        """The asyncio engine of the application role, bound per transaction like ``engine``."""
        return self.engines.async_app

    @property
    def admin_engine(self) -> Engine:
        """The admin role's engine: no tenant binding; used by :func:`platform_context`."""
        return self.engines.admin

    @property
    def async_admin_engine(self) -> AsyncEngine:
        """The asyncio engine of the admin role (no tenant binding)."""
        return self.engines.async_admin

    @property
    def tenant_engines(self) -> EngineCache:
        """Database tenants' engines (a bounded cache); ``tenant_engines.stats()`` gives its counters."""
        return self.engines.tenants

    @property
    def _fault_injector(self) -> Callable[[str], None] | None:
        """Test hook: called with each provisioning step's name; raise to simulate a failure."""
        return self._steps.injector

    @_fault_injector.setter
    def _fault_injector(self, injector: Callable[[str], None] | None) -> None:
        self._steps.injector = injector

    def connect(self) -> Connection:
        """A Core connection to the active tenant's placement (its own database for a database
        tenant; the main database otherwise), bound per transaction like a session's."""
        return self.bind_for_current().connect()

    def placement(self, name: str) -> Placement:
        """The placement called ``name`` (:class:`ProvisioningError` if there is none)."""
        return self.services.placement(name)

    def strategy_named(self, name: str) -> Placement:
        """The former name of :meth:`placement`."""
        return self.services.placement(name)

    def _database_placement(self) -> DatabasePlacement:
        placement = self.placement("database")
        assert isinstance(placement, DatabasePlacement)
        return placement

    def prepare_server(
        self, superuser_url: str | URL, server: str = "main", *, restrict_maintenance_databases: bool = True
    ) -> None:
        """One-time set-up, as a superuser, of a server for database tenants: a template database
        (``<name_prefix>_template``, owned by the admin role) with postgres_fdw installed and the
        admin role allowed to use it. Idempotent.

        :param restrict_maintenance_databases: take ``CONNECT`` and ``TEMPORARY`` on the server's
            maintenance databases (``postgres``, ``template1``, and the databases of
            ``superuser_url`` and of the server's admin URL, but never the main database, which
            :meth:`install` restricts) from ``PUBLIC``, and grant ``CONNECT`` back to the server's
            admin role on the database of its URL, the one it connects to. Without it, every
            tenant's login role can open them, since ``CREATE DATABASE`` lets ``PUBLIC`` connect.
            Any other role that connects to them afterwards (monitoring, another application on a
            shared cluster) needs its own ``GRANT CONNECT``; pass False to leave them as they
            are, and provisioning logs a warning naming what each new tenant's login role can open.
        """
        self._database_placement().prepare_server(
            plain_url(make_url(superuser_url)),
            server,
            restrict_maintenance_databases=restrict_maintenance_databases,
        )

    def refresh_foreign_schemas(self, tenant: str | uuid.UUID | Tenant | None = None) -> list[Tenant]:
        """Re-import the infrastructure schemas into every database tenant (or just ``tenant``),
        the pool's pending ones included, so that added, dropped and renamed columns and new
        tables are seen. Idempotent; each tenant is
        refreshed in one transaction. Returns the tenants refreshed."""
        placement = self._database_placement()
        targets = self._database_tenants(tenant, "it has no foreign schemas")
        for target in targets:
            placement.import_foreign_schemas(target)
        return targets

    def rehash_role_passwords(self, tenant: str | uuid.UUID | Tenant | None = None) -> list[Tenant]:
        """Give the login roles of every database tenant (or just ``tenant``), the pool's pending
        ones included, new SCRAM verifiers of their same passwords, with
        ``tenant_scram_iterations`` iterations: how a changed count reaches the roles created
        before. Open connections are unaffected. Returns the tenants done."""
        placement = self._database_placement()
        targets = self._database_tenants(tenant, "it has no login roles of its own")
        for target in targets:
            placement.rehash_passwords(target)
        return targets

    def _database_tenants(self, tenant: str | uuid.UUID | Tenant | None, lacking: str) -> list[Tenant]:
        """``tenant`` (refused unless a database tenant: ``lacking`` says what it has not), or
        every database tenant that has its database (active, suspended or pending)."""
        if tenant is None:
            return [
                t
                for t in self.list_tenants()
                if t.strategy == "database" and t.status in ("active", "suspended", "pending")
            ]
        target = self.get_tenant(tenant)
        if target.strategy != "database":
            raise UnsupportedOperation(f"Tenant {target.slug!r} is not a database tenant: {lacking}.")
        return [target]

    # -- sessions ---------------------------------------------------------------------------

    def sessionmaker(self, **kw: Any) -> orm_sessionmaker[TenantSession]:
        """A ``sessionmaker`` of :class:`TenantSession` routed by the active tenant."""
        kw.setdefault("class_", self._session_class)
        return orm_sessionmaker(tenancy=self, **kw)

    def async_sessionmaker(self, **kw: Any) -> async_sessionmaker[AsyncSession]:
        """An ``async_sessionmaker`` whose sync session class is :class:`TenantSession`."""
        kw.setdefault("sync_session_class", self._session_class)
        return async_sessionmaker(tenancy=self, tenancy_async=True, **kw)

    # -- resolution (hot path: every transaction begin) ---------------------------------------

    def resolve(self, ref: str | uuid.UUID | Tenant | None) -> Tenant:
        """The active tenant for ``ref`` (the default tenant when ``None``), checked usable:
        :class:`TenantRequired`, :class:`TenantNotFound` or :class:`TenantSuspended` otherwise."""
        return self.router.resolve(ref)

    def identity_token(self) -> str:
        """The identity-map token of the current context: the tenant's id, or ``"platform"``."""
        return self.router.current().token

    def bind_for_current(self, *, async_: bool = False) -> Engine:
        """The engine a session uses now: the admin engine in :func:`platform_context`, else the
        active tenant's placement."""
        return self.router.current().engine(async_)

    # -- registry API -----------------------------------------------------------------------

    def get_tenant(self, slug_or_id: str | uuid.UUID | Tenant) -> Tenant:
        """The tenant with this slug or id, whatever its status; :class:`TenantNotFound` if none."""
        return self.registry.get(lookup_key(slug_or_id))

    def list_tenants(self) -> list[Tenant]:
        """Every tenant, whatever its status, oldest first (not cached)."""
        return self.registry.all()

    # -- lifecycle --------------------------------------------------------------------------

    def install(self) -> None:
        """Create (idempotently) the registry, the policy function, the main database's tables
        with their RLS, the application role's grants and the default tenant."""
        from .installer import install

        install(self.config, self.engines.admin, self.registry)

    def create_tenant(
        self,
        slug: str,
        *,
        placement: str | None = None,
        name: str | None = None,
        server: str | None = None,
        strategy: str | None = None,
    ) -> Tenant:
        """Register and provision a tenant; returns it active.

        ``placement`` (default ``"shared"``; ``strategy`` is its former, deprecated name):
        ``"shared"`` (rows in the main database's tables, guarded
        by RLS), ``"schema"`` (a schema of its own in the main database) or ``"database"`` (a
        database of its own, on the main cluster or on ``server``, one of the ``servers`` given to
        Tenancy). A failure at any step leaves nothing behind (:class:`ProvisioningError`) and
        the same call can simply be retried. A tenant whose database, schema or role would carry
        a name sqla-tenancy owns (:func:`~sqla_tenancy.lifecycle.library_names`), or a name that
        exists already, is refused before anything is made; the clean-up after a failure drops
        only what this tenant's provisioning created. See :mod:`sqla_tenancy.lifecycle`.
        """
        from .lifecycle import create_tenant

        if strategy is not None:
            if placement is not None:
                raise TypeError("create_tenant() takes placement=, or its former name strategy=, not both")
            warnings.warn(
                "create_tenant(strategy=...) is deprecated: pass placement=... instead",
                DeprecationWarning,
                stacklevel=2,
            )
            placement = strategy
        if self.config.distributed and placement == "database":
            raise UnsupportedOperation(
                "distributed=True (Citus) serves shared and schema tenants; a database tenant is "
                "not supported on a distributed main database (see docs/scale-out.md)."
            )
        placement = placement or "shared"
        self.events.emit(TenantEvent("before_create", slug, placement=placement))
        with self.events.subject(slug, placement):
            tenant = self._claim_pending(slug, placement, name=name, server=server)
            if tenant is None:
                tenant = create_tenant(
                    self.services, slug, placement_name=placement, name=name, server=server
                )
        try:
            if placement == "schema":
                from .audit import audit_new_schema_tenant

                audit_new_schema_tenant(self.services, tenant)
            if self.events.has("after_create"):
                self.events.after(
                    TenantEvent("after_create", slug, tenant, placement),
                    done="the tenant was deleted again, so nothing of it is left: fix the callback "
                    "and create it again.",
                )
        except BaseException:
            from .lifecycle import delete_tenant

            delete_tenant(self.services, self.get_tenant(tenant.id), keep_infrastructure_rows=False)
            raise
        if placement == "database":
            self._refill_soon()
        return tenant

    def _claim_pending(
        self, slug: str, placement: str, *, name: str | None, server: str | None
    ) -> Tenant | None:
        """A database tenant from the pool (see :mod:`sqla_tenancy.pool`), or None."""
        if placement != "database":
            return None
        from sqlalchemy.exc import DBAPIError

        from .pool import claim

        try:
            return claim(self.services, slug, name=name, server=server)
        except DBAPIError as error:  # e.g. somebody is connected to the pending database
            log.warning("could not claim a pending tenant for %s (%s); provisioning one", slug, error.orig)
            return None

    def fill_pool(self, count: int, *, server: str | None = None) -> list[Tenant]:
        """Provision ``count`` pending database tenants ahead, which ``create_tenant(...,
        placement="database")`` then claims in one transaction instead of provisioning (see
        :mod:`sqla_tenancy.pool`). Returns the tenants made."""
        from .pool import fill_pool

        return fill_pool(self.services, count, server=server)

    def refill_pool(self, target: int | None = None) -> list[Tenant]:
        """Top the pool of pending database tenants up to ``target`` (default: the
        ``pending_tenants={"database": N}`` this Tenancy was configured with); the tenants made.
        Returns ``[]`` at once while another process tops it up. ``sqla-tenancy tenants pool
        --refill`` runs this; a process that creates database tenants runs it in the background
        by itself when ``pending_tenants`` is configured."""
        from .pool import refill_pool

        if target is None:
            target = self.config.pending_tenants.get("database")
            if target is None:
                raise ConfigurationError(
                    "No pool size is configured: pass Tenancy(pending_tenants={'database': N}), or "
                    "refill_pool(target=N) (fill_pool(N) adds N whatever the pool holds)."
                )
        return refill_pool(self.services, target)

    def _refill_soon(self) -> None:
        """After a database tenant was created: top the configured pool up in a background
        thread (one at a time per process; a failure is logged, the next creation retries)."""
        target = self.config.pending_tenants.get("database", 0)
        if not target or self._closing.is_set() or not self._refilling.acquire(blocking=False):
            return

        def refill() -> None:
            from .pool import refill_pool

            try:
                refill_pool(self.services, target, stop=self._closing)
            except Exception:
                log.exception(
                    "pool: topping the pool of pending tenants up failed; the next "
                    "create_tenant (or `sqla-tenancy tenants pool --refill`) retries"
                )
            finally:
                self._refilling.release()

        self._refill_thread = threading.Thread(target=refill, name="sqla-tenancy-pool-refill", daemon=True)
        self._refill_thread.start()

    def _stop_refill(self) -> None:
        """Let a background refill finish the tenant it is provisioning, then stop it."""
        self._closing.set()
        thread = self._refill_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)

    def pending_tenants(self) -> list[Tenant]:
        """The pool of pending database tenants, the next one claimed first."""
        from .pool import pending_tenants

        return pending_tenants(self.services)

    def update_tenant(self, slug: str, *, name: str) -> Tenant:
        """Rename a tenant (its display name; the slug is permanent)."""
        return self._update(slug, name=name)

    def suspend_tenant(self, slug: str) -> Tenant:
        """Refuse every query for the tenant (in every process, within a second) until resumed."""
        return self._with_events("suspend", slug, lambda: self._update(slug, status="suspended"))

    def resume_tenant(self, slug: str) -> Tenant:
        """Lift a suspension; every process serves the tenant again within a second."""
        return self._with_events("resume", slug, lambda: self._update(slug, status="active"))

    def _with_events(self, action: str, slug: str, operation: Callable[[], Tenant]) -> Tenant:
        before = self.get_tenant(lookup_key(slug))
        if before.is_default:  # refused before any callback runs
            raise UnsupportedOperation("The default tenant cannot be renamed, suspended or resumed.")
        self.events.emit(TenantEvent(f"before_{action}", before.slug, before, before.strategy))
        tenant = operation()
        self.events.after(
            TenantEvent(f"after_{action}", tenant.slug, tenant, tenant.strategy),
            done=f"the tenant stays {tenant.status}.",
        )
        return tenant

    # -- lifecycle events -------------------------------------------------------------------

    @overload
    def on(self, event: EventName, fn: Hook) -> Hook: ...

    @overload
    def on(self, event: EventName, fn: None = None) -> Callable[[Hook], Hook]: ...

    def on(self, event: EventName, fn: Hook | None = None) -> Hook | Callable[[Hook], Hook]:
        """Run ``fn(event)`` on a lifecycle event (``"before_create"``, ``"after_create"``,
        ``"before_delete"``, ..., ``"step"``); without ``fn``, a decorator. See
        :mod:`sqla_tenancy.events` for what a failing callback does."""
        return self.events.on(event, fn)

    def off(self, event: EventName, fn: Hook) -> None:
        """Stop running ``fn`` on ``event``."""
        self.events.off(event, fn)

    def _update(self, slug: str | uuid.UUID | Tenant, **values: str) -> Tenant:
        key = lookup_key(slug)
        with self.admin_engine.begin() as admin:
            tenant_id = self.store.update(admin, key, **values)
        if tenant_id is None:
            if self.get_tenant(key).is_default:  # TenantNotFound when there is no such tenant
                raise UnsupportedOperation("The default tenant cannot be renamed, suspended or resumed.")
            raise TenantNotFound(slug)
        self.registry.invalidate([tenant_id])
        return self.get_tenant(tenant_id)

    def delete_tenant(
        self, slug: str, *, keep_infrastructure_rows: bool = False, timeout: float = 30.0
    ) -> None:
        """Delete the tenant's data, storage, roles and registry row; nothing is left behind.

        The tenant is stopped everywhere first: refused by every process and by the database, its
        transactions in flight waited out (up to ``timeout`` seconds; a database tenant's sessions
        are ended). A deletion that fails (:class:`DeletionError`) leaves the tenant refused, as
        ``deleting``; running it again finishes it. See :func:`sqla_tenancy.lifecycle.delete_tenant`.

        ``keep_infrastructure_rows=True`` keeps the tenant's rows in the infrastructure tables
        (e.g. users, for an audit trail)."""
        from .lifecycle import delete_tenant

        tenant = self.get_tenant(lookup_key(slug))
        self.events.emit(TenantEvent("before_delete", tenant.slug, tenant, tenant.strategy))
        with self.events.subject(tenant.slug, tenant.strategy):
            delete_tenant(
                self.services, tenant, keep_infrastructure_rows=keep_infrastructure_rows, timeout=timeout
            )
        self.events.after(
            TenantEvent("after_delete", tenant.slug, tenant, tenant.strategy), done="the tenant is deleted."
        )

    def move_tenant(self, slug: str, placement: str, *, server: str | None = None) -> Tenant:
        """Move a tenant to another placement (``"shared"``, ``"schema"`` or ``"database"``; a
        database tenant also to another ``server``): its rows are copied, checked per table (count
        and checksum), the registry switched in one transaction and the source removed; the
        tenant is read-only meanwhile (writes get an error naming the move). A failure before the
        switch leaves it active at its source with every row and nothing of the target
        (:class:`~sqla_tenancy.move.MoveError`). Moving a tenant to the placement it is at
        undoes a move of it that a crash interrupted (the doctor's ``move-interrupted``): writable
        again there, the target's objects dropped. See :mod:`sqla_tenancy.move`."""
        from .move import move_tenant

        tenant = self.get_tenant(lookup_key(slug))
        if self.config.distributed:
            raise UnsupportedOperation(
                "move_tenant() between placements is not supported on a distributed main database "
                "(Citus); to move a tenant to another node, use move_tenant_node() (see "
                "docs/scale-out.md)."
            )
        self.events.emit(
            TenantEvent("before_move", tenant.slug, tenant, placement, details={"from": tenant.strategy})
        )
        with self.events.subject(tenant.slug, placement):
            moved = move_tenant(self.services, tenant, placement, server=server)
        if moved.strategy == "schema":
            from .audit import audit_new_schema_tenant

            audit_new_schema_tenant(self.services, moved)
        self.events.after(
            TenantEvent("after_move", moved.slug, moved, placement, details={"from": tenant.strategy}),
            done=f"the tenant is a {placement} tenant now.",
        )
        return moved

    def _distributed(self, slug: str | uuid.UUID | Tenant, doing: str) -> Tenant:
        tenant = self.get_tenant(lookup_key(slug))
        if not self.config.distributed:
            raise UnsupportedOperation(
                f"{doing} applies to a distributed main database (Tenancy(distributed=True), Citus)."
            )
        if tenant.strategy not in ("shared", "schema"):
            raise UnsupportedOperation(
                f"Tenant {tenant.slug!r} is a {tenant.strategy} tenant: {doing} is for shared and "
                "schema tenants."
            )
        return tenant

    def node_logins(self, slug: str | uuid.UUID | Tenant | None = None) -> list[tuple[str, str]]:
        """On Citus (``distributed=True``): the roles, besides the application and admin roles,
        that the coordinator's connections to the workers log in as (Citus connects as the
        current role), with their passwords (derived from ``secret_key``, stored nowhere). With
        no tenant: the shared placement's anonymous role; with a schema tenant: its role and its
        anonymous role. The cluster must let them in from the coordinator: ``pg_dist_authinfo``
        rows (a superuser's, e.g. from an ``after_create`` hook), or a ``pg_hba.conf`` rule. See
        ``docs/scale-out.md``."""
        if not self.config.distributed:
            raise UnsupportedOperation("node_logins() applies to a distributed main database (Citus).")
        from .anonymous import anonymous_role
        from .passwords import derive_password

        if slug is None:
            role = anonymous_role(self.config)
            return [(role, derive_password(self.config.secret(), role))]
        tenant = self.get_tenant(lookup_key(slug))
        if tenant.strategy != "schema":
            raise UnsupportedOperation(
                f"Tenant {tenant.slug!r} is a {tenant.strategy} tenant: only schema tenants have roles "
                "of their own on Citus (node_logins() with no tenant gives the shared placement's)."
            )
        placement = self.placement("schema")
        assert isinstance(placement, SchemaPlacement)
        return placement.node_logins(tenant)

    def tenant_node(self, slug: str | uuid.UUID | Tenant) -> TenantNode:
        """On Citus (``distributed=True``), the node holding a tenant: a shared tenant's rows, or a
        schema tenant's distributed schema. Read from Citus's metadata now (it changes when shards
        move: not cached, not in the registry)."""
        from .distribution import schema_node, tenant_node

        tenant = self._distributed(slug, "tenant_node()")
        with self.admin_engine.connect() as conn:
            if tenant.strategy == "schema":
                return schema_node(conn, str(tenant.location["schema"]))
            return tenant_node(conn, tenant.id)

    def move_tenant_node(
        self, slug: str | uuid.UUID | Tenant, node: str | int, *, transfer_mode: str = "auto"
    ) -> TenantNode:
        """On Citus, move a tenant to another worker (``"host:port"`` or a node id), e.g. a noisy
        neighbour to a node of its own. A shared tenant's shards are isolated
        (``isolate_tenant_to_new_shard``) and moved (``citus_move_shard_placement``), every
        tenant table at once; a schema tenant's schema is moved whole (``citus_schema_move``).
        The tenant is served throughout: with ``transfer_mode="auto"`` (logical replication;
        needs ``wal_level = logical``) its writes wait only for the final switch-over, with
        ``"block_writes"`` for the copy. Returns where it is now. See
        :func:`sqla_tenancy.distribution.move_tenant_node`."""
        from .distribution import move_schema_node, move_tenant_node

        tenant = self._distributed(slug, "move_tenant_node()")
        with self.admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if tenant.strategy == "schema":
                schema = str(tenant.location["schema"])
                return move_schema_node(conn, schema, node, transfer_mode=transfer_mode)
            return move_tenant_node(conn, tenant.id, node, transfer_mode=transfer_mode)

    def export_tenant(self, slug: str, path: str | os.PathLike[str], *, pg_dump: str | None = None) -> Path:
        """Write one tenant's data to ``path`` as a SQL script that restores into an empty database
        with ``psql``; no row of another tenant is in it. See :mod:`sqla_tenancy.export`."""
        from .export import export_tenant

        tenant = self.get_tenant(lookup_key(slug))
        return export_tenant(self.services, tenant, Path(path), pg_dump=Path(pg_dump) if pg_dump else None)

    # -- day-2 operations -------------------------------------------------------------------

    def doctor(self) -> list[Finding]:
        """Audit the live databases against the isolation model; the findings, errors first
        (empty: nothing wrong). Changes nothing. See :mod:`sqla_tenancy.doctor`."""
        from .doctor import doctor

        return doctor(self.services)

    def run_sql(
        self, tenant: str | uuid.UUID | Tenant, script: str, *, timeout: float = 30.0
    ) -> list[StatementResult]:
        """Run a multi-statement SQL script as ``tenant``, in its sandbox: its own role and
        search path, one transaction, ``timeout`` seconds. A script that would reach another
        tenant or leave the sandbox is refused (:class:`ScriptRefused`) or rolled back; the
        database is the boundary, not the text check. See :mod:`sqla_tenancy.sandbox`."""
        from .sandbox import run_sql

        return run_sql(self.services, self.get_tenant(lookup_key(tenant)), script, timeout=timeout)

    def for_each_tenant(
        self,
        fn: Callable[[Tenant], Any],
        *,
        reason: str,
        placements: Iterable[str] | None = None,
        tenants: Iterable[str | uuid.UUID | Tenant] | None = None,
        concurrency: int = 4,
    ) -> list[TenantResult]:
        """Call ``fn(tenant)`` for every active tenant (of ``placements``, or only ``tenants``),
        each inside ``tenant_context(tenant)``, ``concurrency`` at a time, as a platform operation
        logged with ``reason``. One result per tenant, failures included (see
        :mod:`sqla_tenancy.fleet`)."""
        from .fleet import for_each_tenant

        return for_each_tenant(
            self.services, fn, reason=reason, placements=placements, tenants=tenants, concurrency=concurrency
        )

    def query_all_tenants(
        self,
        statement: Executable,
        *,
        reason: str,
        placements: Iterable[str] | None = None,
        concurrency: int = 4,
    ) -> list[TenantRow]:
        """Run a SELECT over every active tenant and return its rows tagged with their tenant:
        one query for all shared tenants, one per schema or database tenant, run concurrently
        (see :mod:`sqla_tenancy.fleet`)."""
        from .fleet import query_all_tenants

        return query_all_tenants(
            self.services, statement, reason=reason, placements=placements, concurrency=concurrency
        )

    def install_audit(self, *, tenant_writes: bool = False) -> None:
        """Record every write made in :func:`platform_context` (and, with ``tenant_writes``,
        every tenant's own writes too) to the main database's tables in ``tenancy.audit_log``,
        by statement-level triggers. Idempotent. See :mod:`sqla_tenancy.audit`."""
        from .audit import install_audit

        install_audit(self.services, tenant_writes=tenant_writes)

    def audit_log(
        self,
        *,
        tenant: str | uuid.UUID | Tenant | None = None,
        since: Any = None,
        limit: int | None = 1000,
    ) -> list[AuditEntry]:
        """The audit trail, newest first: every entry, or those of ``tenant``, since ``since``
        (a datetime)."""
        from .audit import audit_log

        target = self.get_tenant(lookup_key(tenant)) if tenant is not None else None
        return audit_log(self.services, tenant=target, since=since, limit=limit)

    # -- teardown ---------------------------------------------------------------------------

    def dispose(self) -> None:
        """Close every pool and the registry listener.

        From async code use :meth:`dispose_async` (this raises inside a running event loop when
        async engines exist, rather than leave their connections half-closed).
        """
        if self.engines.has_async:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                asyncio.run(self.dispose_async())
                return
            raise UnsupportedOperation("Inside an event loop, call `await tenancy.dispose_async()` instead.")
        self._stop_refill()
        self.registry.close()
        self.engines.dispose_sync()

    async def dispose_async(self) -> None:
        """Dispose the async engines (tenant databases' included), then everything else."""
        await asyncio.to_thread(self._stop_refill)
        await self.engines.dispose_async()
        self.registry.close()
