"""The configuration of a :class:`~sqla_tenancy.Tenancy`: one validated, frozen object that every
layer below the facade receives instead of the facade itself.

What the application passes to ``Tenancy(...)`` is checked here once, at construction, with an
error that names the argument; everything derived from it (the tenant and infrastructure tables,
a server's admin URL, the secret key, the tenant stream's heads) is answered here too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import URL, make_url

from .errors import ConfigurationError, ProvisioningError
from .identifiers import validate_prefix, validate_slug

__all__ = ["CREATE_DATABASE_STRATEGIES", "MigrationsSource", "TenancyConfig", "plain_url"]

#: Accepted values of ``create_database_strategy`` (``None``: the server's default).
CREATE_DATABASE_STRATEGIES = (None, "file_copy", "wal_log")
#: PostgreSQL's own default for the SCRAM verifiers it computes (``scram_iterations``, PG16+)
DEFAULT_SCRAM_ITERATIONS = 4096


def plain_url(url: URL) -> URL:
    """The URL with the stock psycopg driver (admin work, registry reads)."""
    return url.set(drivername="postgresql+psycopg")


class MigrationsSource:
    """The project's Alembic configuration (an ``alembic.ini`` path or a ``Config``), if any.

    The one part of the configuration that may be given late: the Alembic extension attaches the
    configuration it runs with to a Tenancy made without one, so that tenants created during the
    run are born at head. Whoever holds the :class:`TenancyConfig` sees it.
    """

    __slots__ = ("_config", "_value")

    def __init__(self, value: Any = None) -> None:
        self._value = value
        self._config: Any = None

    @property
    def value(self) -> Any:
        """What was given (``None``: the schema is not managed by migrations)."""
        return self._config if self._config is not None else self._value

    def attach(self, value: Any) -> None:
        self._value = value
        self._config = None

    def alembic_config(self) -> Any:
        """The Alembic ``Config`` (``None`` when not configured), loaded once."""
        if self._value is None:
            return None
        if self._config is None:
            from .versions import load_config  # Alembic is imported only where migrations are used

            self._config = load_config(self._value)
        return self._config


def _pending_targets(pending_tenants: Mapping[str, int] | None) -> dict[str, int]:
    """``pending_tenants=``, checked: only database tenants are provisioned ahead."""
    targets = dict(pending_tenants or {})
    for placement, count in targets.items():
        if placement != "database":
            raise ConfigurationError(
                f"pending_tenants={{{placement!r}: ...}}: only database tenants can be provisioned "
                "ahead (shared and schema tenants are created in one transaction, without CREATE "
                "DATABASE). Pass pending_tenants={'database': N}."
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigurationError(
                f"pending_tenants={{'database': {count!r}}}: the number of pending tenants to keep "
                "must be an int >= 0."
            )
    return targets


@dataclass(frozen=True)
class TenancyConfig:
    """Everything ``Tenancy(...)`` was configured with, validated (see :class:`Tenancy` for the
    meaning of each argument). Build it with :meth:`create`."""

    #: the application role's URL
    url: URL
    #: the admin role's URL (``url`` when not given)
    admin_url: URL
    #: where registry look-ups and the LISTEN connection go
    registry_url: URL
    metadata: MetaData
    infrastructure_schemas: frozenset[str]
    default_tenant: str | None
    allow_bypassrls: bool
    #: keyword arguments of the application's engines
    engine_options: Mapping[str, Any]
    registry_ttl: float
    registry_listen: bool
    name_prefix: str
    #: every server database tenants may live on, by name, ``"main"`` included: admin URLs
    servers: Mapping[str, URL]
    secret_key: bytes | None
    tenant_pool_size: int
    tenant_max_overflow: int
    max_tenant_engines: int
    max_tenant_connections: int | None
    create_database_strategy: str | None
    #: where tenant databases' postgres_fdw reaches the main database (``admin_url``'s host and
    #: port when not given)
    fdw_host: str | None = None
    fdw_port: int | None = None
    #: the project's Alembic configuration, if its schema is managed by migrations
    migrations: MigrationsSource = field(default_factory=MigrationsSource)
    #: the main database is a Citus coordinator: tenant tables are distributed by ``tenant_id``
    #: (see :mod:`sqla_tenancy.distribution`)
    distributed: bool = False
    #: how many pending tenants to keep provisioned ahead, by placement (``{"database": 5}``;
    #: see :mod:`sqla_tenancy.pool`)
    pending_tenants: Mapping[str, int] = field(default_factory=dict)
    #: the PBKDF2 iteration count of the SCRAM verifiers given to the login roles sqla-tenancy
    #: creates (database tenants' application and FDW roles)
    tenant_scram_iterations: int = DEFAULT_SCRAM_ITERATIONS
    #: per server, the address (host, port, query options) database tenants' engines connect
    #: through, e.g. a PgBouncer; the role, password and database stay the tenant's own
    tenant_poolers: Mapping[str, URL] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        url: str | URL,
        *,
        metadata: MetaData,
        admin_url: str | URL | None = None,
        infrastructure_schemas: Iterable[str] = (),
        default_tenant: str | None = "default",
        allow_bypassrls: bool = False,
        engine_options: Mapping[str, Any] | None = None,
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
        tenant_scram_iterations: int = DEFAULT_SCRAM_ITERATIONS,
        tenant_poolers: Mapping[str, str | URL] | None = None,
    ) -> TenancyConfig:
        """Check the arguments of ``Tenancy(...)`` and build the configuration."""
        app = make_url(url)
        if app.get_backend_name() != "postgresql":
            raise ConfigurationError(f"sqla-tenancy needs PostgreSQL; got a {app.get_backend_name()} URL")
        admin = make_url(admin_url) if admin_url is not None else app
        if default_tenant is not None and default_tenant != "default":
            validate_slug(default_tenant)
        if create_database_strategy not in CREATE_DATABASE_STRATEGIES:
            raise ConfigurationError("create_database_strategy must be 'file_copy', 'wal_log' or None")
        if max_tenant_engines < 1:
            raise ConfigurationError("max_tenant_engines must be at least 1")
        if fdw_host is not None and (not isinstance(fdw_host, str) or not fdw_host):
            raise ConfigurationError("fdw_host must be a non-empty host name or address")
        if fdw_port is not None and (not isinstance(fdw_port, int) or not 0 < fdw_port < 65536):
            raise ConfigurationError("fdw_port must be a TCP port number (1-65535)")
        if (
            isinstance(tenant_scram_iterations, bool)
            or not isinstance(tenant_scram_iterations, int)
            or tenant_scram_iterations < 1
        ):
            raise ConfigurationError(
                "tenant_scram_iterations must be a whole number of at least 1 (PostgreSQL's default: "
                f"{DEFAULT_SCRAM_ITERATIONS})"
            )
        pending = _pending_targets(pending_tenants)
        known = {"main": admin}
        for name, server_url in (servers or {}).items():
            known[name] = plain_url(make_url(server_url))
        poolers = {name: _pooler_url(name, value, known) for name, value in (tenant_poolers or {}).items()}
        return cls(
            url=app,
            admin_url=admin,
            registry_url=plain_url(make_url(registry_url) if registry_url is not None else app),
            metadata=metadata,
            infrastructure_schemas=frozenset(infrastructure_schemas),
            default_tenant=default_tenant,
            allow_bypassrls=allow_bypassrls,
            engine_options=dict(engine_options or {}),
            registry_ttl=registry_ttl,
            registry_listen=registry_listen,
            name_prefix=validate_prefix(name_prefix),
            servers=known,
            secret_key=secret_key.encode() if isinstance(secret_key, str) else secret_key,
            tenant_pool_size=tenant_pool_size,
            tenant_max_overflow=tenant_max_overflow,
            max_tenant_engines=max_tenant_engines,
            max_tenant_connections=max_tenant_connections,
            create_database_strategy=create_database_strategy,
            fdw_host=fdw_host,
            fdw_port=fdw_port,
            migrations=MigrationsSource(migrations),
            distributed=distributed,
            pending_tenants=pending,
            tenant_scram_iterations=tenant_scram_iterations,
            tenant_poolers=poolers,
        )

    # -- derived --------------------------------------------------------------------------------

    @property
    def app_role(self) -> str | None:
        """The application role's name."""
        return self.url.username

    def tenant_tables(self) -> list[Table]:
        """The application's tenant tables (every table outside the infrastructure schemas)."""
        return [t for t in self.metadata.sorted_tables if t.schema not in self.infrastructure_schemas]

    def infrastructure_tables(self) -> list[Table]:
        """The tables in the infrastructure schemas."""
        return [t for t in self.metadata.sorted_tables if t.schema in self.infrastructure_schemas]

    def server_admin_url(self, server: str) -> URL:
        """The admin URL of a server database tenants can be placed on (``"main"`` included)."""
        try:
            return self.servers[server]
        except KeyError:
            raise ProvisioningError(
                f"Unknown server {server!r}; configured: {', '.join(sorted(self.servers))}. "
                "Pass servers={name: admin_url} to Tenancy."
            ) from None

    def has_secret(self) -> bool:
        """Whether a secret key to derive role passwords from is configured (see :meth:`secret`)."""
        return len(self.secret_key or os.environ.get("SQLA_TENANCY_SECRET_KEY", "").encode()) >= 16

    def tenant_address(self, server: str) -> URL:
        """The URL whose address (host, port, query options) a database tenant on ``server``
        connects to: its pooler's (``tenant_poolers``), else the server's admin URL."""
        return self.tenant_poolers.get(server) or self.server_admin_url(server)

    def secret(self) -> bytes:
        """The key tenant role passwords are derived from."""
        key = self.secret_key or os.environ.get("SQLA_TENANCY_SECRET_KEY", "").encode()
        if len(key) < 16:
            raise ProvisioningError(
                "Database tenants (and schema tenants on Citus) need a secret key of at least 16 "
                "bytes to derive their role passwords: pass Tenancy(secret_key=...) or set "
                "SQLA_TENANCY_SECRET_KEY."
            )
        return key

    def fdw_address(self) -> tuple[str, int, str]:
        """Where a tenant database's foreign server connects: host, port and the main database
        (``fdw_host`` and ``fdw_port``, else ``admin_url``'s: not ``url``, which may be a pooler)."""
        main = self.admin_url
        return (
            self.fdw_host or main.host or "localhost",
            self.fdw_port or main.port or 5432,
            main.database or "",
        )

    @property
    def alembic_config(self) -> Any:
        """The Alembic ``Config`` of ``migrations`` (``None`` when not configured)."""
        return self.migrations.alembic_config()

    def tenant_heads(self) -> tuple[str, ...] | None:
        """The tenant stream's head revisions of ``migrations`` (None when not configured): what a
        location created from the models is stamped with."""
        if self.alembic_config is None:
            return None
        from .versions import TENANT, config_stream_heads

        return config_stream_heads(self.alembic_config, TENANT)


#: connection options that would choose a role, password or database (refused in tenant_poolers)
_IDENTITY_OPTIONS = frozenset({"user", "password", "dbname", "database", "service", "passfile"})


def _pooler_url(server: str, value: str | URL, servers: Mapping[str, URL]) -> URL:
    """A ``tenant_poolers`` entry, checked: a PostgreSQL address for a known server, without a
    role, password or database (those are each tenant's own)."""
    if server not in servers:
        raise ConfigurationError(
            f"tenant_poolers names an unknown server {server!r}; configured: "
            f"{', '.join(sorted(servers))}. Pass servers={{name: admin_url}} for it too."
        )
    url = make_url(value)
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"tenant_poolers[{server!r}] must be a PostgreSQL URL (a PgBouncer speaks PostgreSQL's protocol)"
        )
    if url.username or url.password or url.database or _IDENTITY_OPTIONS & set(url.query):
        raise ConfigurationError(
            f"tenant_poolers[{server!r}] gives the pooler's address only, as postgresql://host:port: "
            "each database tenant logs in with its own role and password to its own database."
        )
    if not url.host:
        raise ConfigurationError(f"tenant_poolers[{server!r}] needs a host (postgresql://host:port)")
    return url
