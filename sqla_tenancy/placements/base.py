"""The protocol every placement implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sqlalchemy import Connection
from sqlalchemy.engine import URL, Engine

if TYPE_CHECKING:
    from ..config import TenancyConfig
    from ..engines import Engines
    from ..registry import Tenant
    from ..steps import Steps

__all__ = ["MigrationSite", "Placement", "PlacementBase", "run_script"]


def run_script(conn: Connection, script: str) -> None:
    """Send a multi-statement script in one round trip (simple query protocol, no parameters),
    inside ``conn``'s transaction, bypassing SQLAlchemy's statement logging (scripts may carry
    role passwords' verifiers)."""
    driver = conn.connection.dbapi_connection
    assert driver is not None
    cursor = driver.cursor()
    try:
        cursor.execute(script.encode())
    finally:
        cursor.close()


@dataclass(frozen=True)
class MigrationSite:
    """Where a tenant's tables of its own are, for the tenant stream's migrations: a schema of
    the main database (``kind="schema"``) or a database on a server (``kind="database"``)."""

    kind: Literal["schema", "database"]
    server: str = "main"
    database: str | None = None
    schema: str | None = None


class Placement(Protocol):
    """Provision, bind and remove one placement's tenants: everything placement-specific.

    A placement is built once per :class:`~sqla_tenancy.Tenancy` with what it works with (the
    configuration, the engines, the provisioning steps), so that nobody else branches on its name.
    ``provision`` and ``deprovision`` run on the admin side; ``binding`` and ``engine`` run on every
    transaction begin and ``Session.get_bind`` call, so they must be cheap (cache what they build).
    """

    name: str
    #: provisioning runs inside the transaction that inserts the registry row (else: journaled)
    transactional: bool
    #: each tenant has engines of its own (else: the main engine, bound per transaction)
    per_tenant_engines: bool
    #: its tenants' transactions run in the main database, where ``tenancy.admit_tenant()``
    #: admits each (see :func:`~sqla_tenancy.binding.admit_statement`); a deletion waits for them
    admitted: bool

    def initial_location(self, server: str | None) -> dict[str, Any]:
        """The registry location a new tenant starts with, on ``server`` (``None``: the default);
        :class:`~sqla_tenancy.ProvisioningError` for a server the placement cannot use."""

    def provision(self, tenant: Tenant, *, admin: Connection | None) -> dict[str, Any]:
        """Create the tenant's storage; return what the registry keeps as its ``location``.

        ``admin`` is in the transaction that inserts the tenant's registry row (None for
        non-transactional placements, which manage their own connections). Call the placement's
        ``steps(name)`` before each step (fault-injection tests rely on it)."""

    def deprovision(
        self, tenant: Tenant, *, admin: Connection | None, keep_infrastructure_rows: bool
    ) -> None:
        """Remove the tenant's data and storage (and, unless kept, its infrastructure rows).
        ``admin`` is in the deleting transaction (None for non-transactional placements)."""

    def compensate(self, tenant: Tenant) -> None:
        """Idempotently remove whatever a failed provisioning left (non-transactional placements;
        transactional ones roll back instead and do nothing here)."""

    def derived_names(self, tenant: Tenant) -> dict[tuple[str, str], str]:
        """The databases, schemas and roles provisioning ``tenant`` creates, as
        ``{(kind, name): what it is}`` (checked against the library's own names first)."""

    def dump_target(self, tenant: Tenant) -> tuple[URL, str] | None:
        """Where ``pg_dump`` finds the tenant's own tables, whole: an admin URL of their database
        and the schema (``None``: the tenant's rows share tables and are exported row by row)."""

    def migration_site(self, tenant: Tenant) -> MigrationSite | None:
        """Where the tenant stream is applied for ``tenant`` alone (``None``: its tables are the
        main database's shared ones, migrated once for every such tenant)."""

    def migration_binding(self, tenant: Tenant) -> str:
        """What binds an admin transaction migrating the tenant's location (see
        :func:`~sqla_tenancy.binding.migration_binding_statement`)."""

    def after_migration(self, conn: Connection, tenant: Tenant, *, created: bool) -> None:
        """Bring the tenant's grants in line with the tables a migration just changed at its
        location; ``conn`` is the migration's transaction there, ``created`` whether the tenant
        stream's version table was just made."""

    def binding(self, tenant: Tenant) -> bytes:
        """The transaction-local statements that bind a transaction to ``tenant``."""

    def anonymous_binding(self, tenant: Tenant) -> bytes:
        """The same, for an anonymous scope: ending in ``SET LOCAL ROLE`` to the placement's
        anonymous role (see :mod:`sqla_tenancy.anonymous`)."""

    def engine(self, tenant: Tenant, *, async_: bool) -> Engine:
        """The (sync) engine a session uses for ``tenant``; the async engine's sync_engine when
        ``async_``."""


class PlacementBase:
    """What every placement is built with: the configuration, the engines and the provisioning
    steps (the implementations derive from it; :class:`Placement` is their contract)."""

    def __init__(self, config: TenancyConfig, engines: Engines, steps: Steps) -> None:
        self.config = config
        self.engines = engines
        self.steps = steps
