"""The :class:`Tenancy` facade: what an application constructs once and uses everywhere."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import sessionmaker as orm_sessionmaker
from sqlalchemy.util import greenlet_spawn

from .dialect import DRIVER_NAME, Binder
from .engines import EngineCache
from .errors import (
    ProvisioningError,
    TenancyError,
    TenantNotFound,
    UnsafeRoleError,
)
from .identifiers import validate_prefix, validate_slug
from .registry import Registry, Tenant, TenantStore
from .routing import Router, lookup_key
from .session import TenantSession
from .strategies import DatabaseStrategy, SchemaStrategy, SharedStrategy, Strategy

__all__ = ["Tenancy", "active_tenancy"]

log = logging.getLogger(__name__)

_active: weakref.ref[Tenancy] | None = None


def active_tenancy() -> Tenancy | None:
    """The most recently created :class:`Tenancy` of this process, if it is still alive."""
    return _active() if _active is not None else None


def _plain_url(url: URL) -> URL:
    """The URL with the stock psycopg driver (for admin work and registry reads)."""
    return url.set(drivername="postgresql+psycopg")


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
    :param max_tenant_engines: how many database tenants' engines a process keeps (LRU).
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
    :param registry_listen: keep a LISTEN connection so that registry changes made by other
        processes arrive within a second; with False only ``registry_ttl`` bounds staleness.
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
    ) -> None:
        global _active
        self.url = make_url(url)
        if self.url.get_backend_name() != "postgresql":
            raise TenancyError(f"sqla-tenancy needs PostgreSQL; got a {self.url.get_backend_name()} URL")
        self.admin_url = make_url(admin_url) if admin_url is not None else self.url
        self.metadata = metadata
        self.infrastructure_schemas = frozenset(infrastructure_schemas)
        if default_tenant is not None and default_tenant != "default":
            validate_slug(default_tenant)
        self.default_tenant = default_tenant
        self.allow_bypassrls = allow_bypassrls
        self._engine_options = dict(engine_options or {})
        self.router = Router(self)
        self._binder: Binder = self.router.binding
        self.engine: Engine = create_engine(
            self.url.set(drivername=f"postgresql+{DRIVER_NAME}"), **self._bound_options()
        )
        self._async_engine: AsyncEngine | None = None
        self._admin_engine: Engine | None = None
        self._async_admin_engine: AsyncEngine | None = None
        self.registry = Registry(
            _plain_url(make_url(registry_url) if registry_url is not None else self.url),
            ttl=registry_ttl,
            listen=registry_listen,
        )
        self.name_prefix = validate_prefix(name_prefix)
        self._strategies: dict[str, Strategy] = {
            "shared": SharedStrategy(),
            "schema": SchemaStrategy(),
            "database": DatabaseStrategy(),
        }
        self.servers: dict[str, URL] = {"main": self.admin_url}
        for server_name, server_url in (servers or {}).items():
            self.servers[server_name] = make_url(server_url).set(drivername="postgresql+psycopg")
        if create_database_strategy not in (None, "file_copy", "wal_log"):
            raise TenancyError("create_database_strategy must be 'file_copy', 'wal_log' or None")
        self.create_database_strategy = create_database_strategy
        #: the Alembic configuration of the project's migrations (see ``migrations``), or None
        self.migrations = migrations
        self._secret = secret_key.encode() if isinstance(secret_key, str) else secret_key
        self._tenant_engine_options = {"pool_size": tenant_pool_size, "max_overflow": tenant_max_overflow}
        self.tenant_engines = EngineCache(
            max_engines=max_tenant_engines, max_connections=max_tenant_connections
        )
        #: the only writer of the registry table (see :class:`~sqla_tenancy.registry.TenantStore`)
        self.store = TenantStore()
        #: Test hook: called with each provisioning step's name; raise to simulate a failure.
        self._fault_injector: Callable[[str], None] | None = None
        _active = weakref.ref(self)

    # -- engines ----------------------------------------------------------------------------

    def _bound_options(self) -> dict[str, Any]:
        """``create_engine`` keywords of an engine bound per transaction: the application's
        options, and the binder and Tenancy its dialect takes."""
        return {**self._engine_options, "binder": self._binder, "tenancy_ref": weakref.ref(self)}

    @property
    def async_engine(self) -> AsyncEngine:
        """The asyncio engine of the application role, bound per transaction like ``engine``."""
        if self._async_engine is None:
            self._async_engine = create_async_engine(
                self.url.set(drivername=f"postgresql+{DRIVER_NAME}"), **self._bound_options()
            )
        return self._async_engine

    @property
    def admin_engine(self) -> Engine:
        """The admin role's engine: no tenant binding; used by :func:`platform_context`."""
        if self._admin_engine is None:
            self._admin_engine = create_engine(_plain_url(self.admin_url))
        return self._admin_engine

    @property
    def async_admin_engine(self) -> AsyncEngine:
        """The asyncio engine of the admin role (no tenant binding)."""
        if self._async_admin_engine is None:
            self._async_admin_engine = create_async_engine(_plain_url(self.admin_url))
        return self._async_admin_engine

    def _main_engine(self, *, async_: bool) -> Engine:
        """The main database's application engine (sync, or the async engine's sync_engine)."""
        return self.async_engine.sync_engine if async_ else self.engine

    def server_admin_url(self, server: str) -> URL:
        """The admin URL of a server database tenants can be placed on (``"main"`` included)."""
        try:
            return self.servers[server]
        except KeyError:
            raise ProvisioningError(
                f"Unknown server {server!r}; configured: {', '.join(sorted(self.servers))}. "
                "Pass servers={name: admin_url} to Tenancy."
            ) from None

    def tenant_heads(self) -> tuple[str, ...] | None:
        """The tenant stream's head revisions of ``migrations`` (None when not configured): what a
        location created from the models is stamped with."""
        if self.migrations is None:
            return None
        from .versions import TENANT, config_stream_heads, load_config

        config = load_config(self.migrations)
        self.migrations = config
        return config_stream_heads(config, TENANT)

    def secret(self) -> bytes:
        """The key tenant role passwords are derived from."""
        key = self._secret or os.environ.get("SQLA_TENANCY_SECRET_KEY", "").encode()
        if len(key) < 16:
            raise ProvisioningError(
                "Database tenants need a secret key of at least 16 bytes to derive their role "
                "passwords: pass Tenancy(secret_key=...) or set SQLA_TENANCY_SECRET_KEY."
            )
        return key

    def _tenant_engine(self, tenant: Tenant, url: Callable[[], URL], *, async_: bool) -> Engine:
        """A database tenant's engine, from the LRU cache; ``url`` is called on a miss only (it
        derives the role's password: no HMAC on the hot path)."""

        def make() -> Engine:
            options = {**self._bound_options(), **self._tenant_engine_options}
            if async_:
                return create_async_engine(url(), **options).sync_engine
            return create_engine(url(), **options)

        return self.tenant_engines.get((tenant.id, async_), make)

    def connect(self) -> Connection:
        """A Core connection to the active tenant's placement (its own database for a database
        tenant; the main database otherwise), bound per transaction like a session's."""
        return self.bind_for_current().connect()

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
        from .strategies.database import DatabaseStrategy

        strategy = self._strategies["database"]
        assert isinstance(strategy, DatabaseStrategy)
        strategy.prepare_server(
            self,
            make_url(superuser_url).set(drivername="postgresql+psycopg"),
            server,
            restrict_maintenance_databases=restrict_maintenance_databases,
        )

    def refresh_foreign_schemas(self, tenant: str | uuid.UUID | Tenant | None = None) -> list[Tenant]:
        """Re-import the infrastructure schemas into every database tenant (or just ``tenant``), so
        that added, dropped and renamed columns and new tables are seen. Idempotent; each tenant is
        refreshed in one transaction. Returns the tenants refreshed."""
        from .strategies.database import DatabaseStrategy

        strategy = self._strategies["database"]
        assert isinstance(strategy, DatabaseStrategy)
        if tenant is not None:
            targets = [self.get_tenant(tenant)]
        else:
            targets = [
                t
                for t in self.list_tenants()
                if t.strategy == "database" and t.status in ("active", "suspended")
            ]
        for target in targets:
            if target.strategy != "database":
                raise TenancyError(f"Tenant {target.slug!r} is not a database tenant.")
            strategy.import_foreign_schemas(self, target)
        return targets

    # -- sessions ---------------------------------------------------------------------------

    def sessionmaker(self, **kw: Any) -> orm_sessionmaker[TenantSession]:
        """A ``sessionmaker`` of :class:`TenantSession` routed by the active tenant."""
        kw.setdefault("class_", TenantSession)
        return orm_sessionmaker(tenancy=self, **kw)

    def async_sessionmaker(self, **kw: Any) -> async_sessionmaker[AsyncSession]:
        """An ``async_sessionmaker`` whose sync session class is :class:`TenantSession`."""
        kw.setdefault("sync_session_class", TenantSession)
        return async_sessionmaker(tenancy=self, tenancy_async=True, **kw)

    def tenant_tables(self) -> list[Table]:
        """The application's tenant tables (every table outside the infrastructure schemas)."""
        return [t for t in self.metadata.sorted_tables if t.schema not in self.infrastructure_schemas]

    def infrastructure_tables(self) -> list[Table]:
        """The tables in the infrastructure schemas."""
        return [t for t in self.metadata.sorted_tables if t.schema in self.infrastructure_schemas]

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

    def strategy_named(self, name: str) -> Strategy:
        """The placement strategy called ``name`` (:class:`ProvisioningError` if unknown)."""
        try:
            return self._strategies[name]
        except KeyError:
            raise ProvisioningError(
                f"Unknown strategy {name!r}; choose one of {', '.join(sorted(self._strategies))}."
            ) from None

    def _strategy(self, tenant: Tenant) -> Strategy:
        try:
            return self._strategies[tenant.strategy]
        except KeyError:
            raise TenancyError(
                f"Tenant {tenant.slug!r} uses strategy {tenant.strategy!r}, which this version "
                f"does not support (available: {', '.join(sorted(self._strategies))})."
            ) from None

    def _check_app_role(self) -> None:
        """Refuse an application role that row-level security would not restrain."""
        rows = self.registry._query(
            "select rolsuper, rolbypassrls from pg_roles where rolname = current_user", ()
        )
        superuser, bypass = rows[0]
        if (superuser or bypass) and not self.allow_bypassrls:
            raise UnsafeRoleError(
                f"The application role {self.url.username!r} is "
                f"{'a superuser' if superuser else 'BYPASSRLS'}, so row-level security would not "
                "isolate tenants. Connect `url` as a NOSUPERUSER NOBYPASSRLS role (keep the "
                "privileged one for admin_url), or pass allow_bypassrls=True in development."
            )

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

        install(self)

    def create_tenant(
        self, slug: str, *, strategy: str = "shared", name: str | None = None, server: str | None = None
    ) -> Tenant:
        """Register and provision a tenant; returns it active.

        ``strategy`` is the placement: ``"shared"`` (rows in the main database's tables, guarded
        by RLS), ``"schema"`` (a schema of its own in the main database) or ``"database"`` (a
        database of its own, on the main cluster or on ``server``, one of the ``servers`` given to
        Tenancy). A failure at any step leaves nothing behind (:class:`ProvisioningError`) and
        the same call can simply be retried. A tenant whose database, schema or role would carry
        a name sqla-tenancy owns (:func:`~sqla_tenancy.lifecycle.library_names`), or a name that
        exists already, is refused before anything is made; the clean-up after a failure drops
        only what this tenant's provisioning created. See :mod:`sqla_tenancy.lifecycle`.
        """
        from .lifecycle import create_tenant

        return create_tenant(self, slug, strategy=strategy, name=name, server=server)

    def _step(self, name: str) -> None:
        """Provisioning checkpoint; tests inject failures here (``_fault_injector``)."""
        if self._fault_injector is not None:
            self._fault_injector(name)

    def update_tenant(self, slug: str, *, name: str) -> Tenant:
        """Rename a tenant (its display name; the slug is permanent)."""
        return self._update(slug, name=name)

    def suspend_tenant(self, slug: str) -> Tenant:
        """Refuse every query for the tenant (in every process, within a second) until resumed."""
        return self._update(slug, status="suspended")

    def resume_tenant(self, slug: str) -> Tenant:
        """Lift a suspension; every process serves the tenant again within a second."""
        return self._update(slug, status="active")

    def _update(self, slug: str | uuid.UUID | Tenant, **values: str) -> Tenant:
        key = lookup_key(slug)
        with self.admin_engine.begin() as admin:
            tenant_id = self.store.update(admin, key, **values)
        if tenant_id is None:
            if self.get_tenant(key).is_default:  # TenantNotFound when there is no such tenant
                raise TenancyError("The default tenant cannot be renamed, suspended or resumed.")
            raise TenantNotFound(slug)
        self.registry.invalidate([tenant_id])
        return self.get_tenant(tenant_id)

    def delete_tenant(self, slug: str, *, keep_infrastructure_rows: bool = False) -> None:
        """Delete the tenant's data, storage, roles and registry row; nothing is left behind.

        ``keep_infrastructure_rows=True`` keeps the tenant's rows in the infrastructure tables
        (e.g. users, for an audit trail)."""
        from .lifecycle import delete_tenant

        delete_tenant(
            self, self.get_tenant(lookup_key(slug)), keep_infrastructure_rows=keep_infrastructure_rows
        )

    def export_tenant(self, slug: str, path: str | os.PathLike[str], *, pg_dump: str | None = None) -> Path:
        """Write one tenant's data to ``path`` as a SQL script that restores into an empty database
        with ``psql``; no row of another tenant is in it. See :mod:`sqla_tenancy.export`."""
        from .export import export_tenant

        tenant = self.get_tenant(lookup_key(slug))
        return export_tenant(self, tenant, Path(path), pg_dump=Path(pg_dump) if pg_dump else None)

    # -- teardown ---------------------------------------------------------------------------

    def dispose(self) -> None:
        """Close every pool and the registry listener.

        From async code use :meth:`dispose_async` (this raises inside a running event loop when
        async engines exist, rather than leave their connections half-closed).
        """
        if self._async_engine is not None or self._async_admin_engine is not None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                asyncio.run(self.dispose_async())
                return
            raise TenancyError("Inside an event loop, call `await tenancy.dispose_async()` instead.")
        self._dispose_sync()

    async def dispose_async(self) -> None:
        """Dispose the async engines (tenant databases' included), then everything else."""
        # Async pools must close their connections inside SQLAlchemy's greenlet bridge.
        await greenlet_spawn(self.tenant_engines.clear)
        if self._async_engine is not None:
            await self._async_engine.dispose()
        if self._async_admin_engine is not None:
            await self._async_admin_engine.dispose()
        self._async_engine = self._async_admin_engine = None
        self._dispose_sync()

    def _dispose_sync(self) -> None:
        self.registry.close()
        self.tenant_engines.clear()
        self.engine.dispose()
        if self._admin_engine is not None:
            self._admin_engine.dispose()
