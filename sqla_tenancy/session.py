"""``TenantSession``: a Session that routes every statement by the active tenant.

Routing happens in :meth:`TenantSession.get_bind`; the tenant is bound to each transaction when it
begins, by the engine's dialect (see :mod:`sqla_tenancy.dialect`), so Core statements, ORM
queries and raw ``text()`` all run inside the tenant's isolation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, Session

if TYPE_CHECKING:
    from .tenancy import Tenancy

__all__ = ["TenantSession"]


class TenantSession(Session):
    """A :class:`~sqlalchemy.orm.Session` bound to whichever tenant is active when it runs SQL.

    Create it with :meth:`Tenancy.sessionmaker` / :meth:`Tenancy.async_sessionmaker`. One session
    may serve several tenants in turn: each tenant gets its own connection and transaction inside
    the session, so a connection bound to one tenant is never reused for another.
    """

    def __init__(self, *args: Any, tenancy: Tenancy, tenancy_async: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.tenancy = tenancy
        self._tenancy_async = tenancy_async

    def get_bind(
        self,
        mapper: Mapper[Any] | type[Any] | None = None,
        *,
        clause: Any = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """Precedence: an explicit ``bind`` argument; then the admin engine inside
        :func:`platform_context`; then the active tenant's placement (the default tenant when none
        is active, or :class:`TenantRequired` when there is no default)."""
        if bind is not None:
            return bind
        return self.tenancy.bind_for_current(async_=self._tenancy_async)
