"""The protocol every placement implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection
from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from ..registry import Tenant
    from ..tenancy import Tenancy

__all__ = ["Strategy"]


class Strategy(Protocol):
    """Provision, bind and remove one placement's tenants.

    ``provision`` and ``deprovision`` run on the admin side; ``binding`` and ``engine`` run on every
    transaction begin and ``Session.get_bind`` call, so they must be cheap (cache what they build).
    """

    name: str

    def provision(self, tenancy: Tenancy, tenant: Tenant, *, admin: Connection) -> dict[str, Any]:
        """Create the tenant's storage; return what the registry keeps as its ``location``.

        ``admin`` is in the transaction that inserts the tenant's registry row. Call
        ``tenancy._step(name)`` before each step (fault-injection tests rely on it)."""

    def deprovision(self, tenancy: Tenancy, tenant: Tenant, *, admin: Connection) -> None:
        """Remove the tenant's data and storage. ``admin`` is in the deleting transaction."""

    def binding(self, tenancy: Tenancy, tenant: Tenant) -> bytes:
        """The transaction-local statements that bind a transaction to ``tenant``."""

    def engine(self, tenancy: Tenancy, tenant: Tenant, *, async_: bool) -> Engine:
        """The (sync) engine a session uses for ``tenant``; the async engine's sync_engine when
        ``async_``."""
