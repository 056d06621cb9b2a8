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

    The first tenant a session serves is its *home*: its objects carry no identity token and it uses
    the plain engine, which keeps the common one-tenant-per-session case as cheap as a plain
    Session. Every other tenant gets its own token and bind.
    """

    def __init__(self, *args: Any, tenancy: Tenancy, tenancy_async: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.tenancy = tenancy
        self._tenancy_async = tenancy_async
        self._home: object = None
        self._serves_several = False

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
        route = self.tenancy.router.current()
        if self._home is None:
            self._home = route.key
        if route.key == self._home:
            return route.engine(self._tenancy_async)
        self._token()  # a second tenant: make sure its objects get their own identity token
        return route.alternate(self._tenancy_async)

    def _token(self) -> str | None:
        """The identity token for the current context (None for the session's home tenant)."""
        route = self.tenancy.router.current()
        if self._home is None:
            self._home = route.key
        if route.key == self._home:
            return None
        if not self._serves_several:
            # From now on loaded objects need tokens; a one-tenant session never pays for the hook.
            self._serves_several = True
            event.listen(self, "do_orm_execute", _tag_loaded_objects)
        return route.token

    def _identity_lookup(  # type: ignore[override]
        self, mapper: Mapper[Any], primary_key_identity: Any, identity_token: Any = None, **kw: Any
    ) -> Any:
        if identity_token is None:
            identity_token = self._token()
        return super()._identity_lookup(mapper, primary_key_identity, identity_token=identity_token, **kw)


def _tag_loaded_objects(state: ORMExecuteState) -> None:
    session = state.session
    assert isinstance(session, TenantSession)
    token = session._token()
    if token is not None and "identity_token" not in state.execution_options:
        state.update_execution_options(identity_token=token)


@event.listens_for(TenantSession, "before_attach")
def _tag_new_objects(session: Session, instance: object) -> None:
    state = inspect(instance)
    if state.key is None and state.identity_token is None:
        assert isinstance(session, TenantSession)
        state.identity_token = session._token()


@event.listens_for(TenantSession, "before_flush")
def _refuse_cross_tenant_flush(session: Session, flush_context: Any, instances: Any) -> None:
    assert isinstance(session, TenantSession)
    token = session._token()
    for obj in (*session.new, *session.dirty, *session.deleted):
        state = inspect(obj)
        owner = state.identity_token if state.key is None else state.key[2]
        if owner != token:
            raise TenancyError(
                f"{type(obj).__name__} belongs to {_describe(session, owner)} but the session is "
                f"flushing for {_describe(session, token)}. Flush (or commit) inside the "
                "tenant_context the object was added or loaded in."
            )


def _describe(session: TenantSession, token: str | None) -> str:
    if token is None:
        return f"tenant {session._home} (the session's first tenant)"
    return f"tenant {token}"
