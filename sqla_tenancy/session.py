"""``TenantSession``: a Session that routes every statement by the active tenant.

Routing happens in :meth:`TenantSession.get_bind`; the tenant is bound to each transaction when it
begins, by the engine's dialect (see :mod:`sqla_tenancy.dialect`), so Core statements, ORM
queries and raw ``text()`` all run inside the tenant's isolation.

Objects carry an *identity token* (the tenant's id) in the identity map, as
``sqlalchemy.ext.horizontal_shard`` does for shards: two tenants' rows with equal primary keys never
collide, and an object loaded for one tenant is never served from the identity map to another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, ORMExecuteState, Session

from .errors import TenancyError

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

    def _identity_lookup(  # type: ignore[override]
        self, mapper: Mapper[Any], primary_key_identity: Any, identity_token: Any = None, **kw: Any
    ) -> Any:
        if identity_token is None:
            identity_token = self.tenancy.identity_token()
        return super()._identity_lookup(mapper, primary_key_identity, identity_token=identity_token, **kw)


@event.listens_for(TenantSession, "do_orm_execute")
def _tag_loaded_objects(state: ORMExecuteState) -> None:
    if "identity_token" not in state.execution_options:
        session = state.session
        assert isinstance(session, TenantSession)
        state.update_execution_options(identity_token=session.tenancy.identity_token())


@event.listens_for(TenantSession, "before_attach")
def _tag_new_objects(session: Session, instance: object) -> None:
    state = inspect(instance)
    if state.key is None and state.identity_token is None:
        assert isinstance(session, TenantSession)
        state.identity_token = session.tenancy.identity_token()


@event.listens_for(TenantSession, "before_flush")
def _refuse_cross_tenant_flush(session: Session, flush_context: Any, instances: Any) -> None:
    assert isinstance(session, TenantSession)
    token = session.tenancy.identity_token()
    for obj in (*session.new, *session.dirty, *session.deleted):
        state = inspect(obj)
        owner = state.identity_token if state.key is None else state.key[2]
        if owner is not None and owner != token:
            raise TenancyError(
                f"{type(obj).__name__} belongs to tenant {owner} but the session is flushing for "
                f"{token}. Flush (or commit) inside the tenant_context the object was added or "
                "loaded in."
            )
