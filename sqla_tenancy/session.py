"""``TenantSession``: a Session that routes every statement by the active tenant.

Routing happens in :meth:`TenantSession.get_bind`; the tenant is bound to each transaction when it
begins, by the engine's dialect (see :mod:`sqla_tenancy.dialect`), so Core statements, ORM
queries and raw ``text()`` all run inside the tenant's isolation.

Objects carry an *identity token* (the tenant's id) in the identity map, as
``sqlalchemy.ext.horizontal_shard`` does for shards: two tenants' rows with equal primary keys never
collide, and an object loaded for one tenant is never served from the identity map to another.

An object belongs to the tenant it was loaded (or added) for, whatever context is active later:
every later load of it (expired or deferred attributes, ``refresh()``, lazy, selectin and other
relationship loads) runs inside that tenant's context, and a flush of it outside that context is
refused. Reading ``project.name`` after ``commit()`` in another tenant's context (or in none) so
returns the object's own row, never the other tenant's row with the same key.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Engine, Executable, ScalarResult, event, inspect, util
from sqlalchemy.engine import Connection, Result
from sqlalchemy.orm import Mapper, Session

from .context import tenant_context
from .errors import CrossTenantAccess, TenancyError
from .routing import Route, Router, token_scope

__all__ = ["TenantSession", "pin_connection", "unpin_connection"]

#: Connections pinned by route key (a tenant's id) by the testing kit: a session serving that
#: tenant joins the connection's transaction with a SAVEPOINT, as SQLAlchemy's "joining a Session
#: into an external transaction" recipe does, so that the application's own ``commit()`` only
#: releases the savepoint and the test rolls everything back at the end. (An ``AsyncSession``'s
#: statements then run on that synchronous connection, blocking: acceptable in tests only.)
_pinned: dict[object, Connection] = {}


def pin_connection(key: object, connection: Connection) -> None:
    """Serve every :class:`TenantSession` (async sessions' included) of route ``key`` (a tenant's id) from
    ``connection``, inside a SAVEPOINT of its transaction (see :mod:`sqla_tenancy.testing`)."""
    _pinned[key] = connection


def unpin_connection(key: object) -> None:
    """Undo :func:`pin_connection` (nothing happens when ``key`` is not pinned)."""
    _pinned.pop(key, None)


class TenantSession(Session):
    """A :class:`~sqlalchemy.orm.Session` bound to whichever tenant is active when it runs SQL.

    Create it with :meth:`Tenancy.sessionmaker` / :meth:`Tenancy.async_sessionmaker`. One session
    may serve several tenants in turn: each tenant gets its own connection and transaction inside
    the session, so a connection bound to one tenant is never reused for another, and each
    tenant's objects carry its identity token. An object's later loads are served from its own
    tenant (see the module documentation).

    The first tenant a session serves uses the plain engine, which keeps the common
    one-tenant-per-session case as cheap as a plain Session; every other tenant gets a bind of
    its own.
    """

    def __init__(
        self,
        *args: Any,
        tenancy: Any = None,
        router: Router | None = None,
        tenancy_async: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        if router is None:
            if tenancy is None:
                raise TypeError("TenantSession needs router= (or tenancy=, whose router it uses)")
            router = tenancy.router
        assert router is not None
        #: what resolves the active context to a route (the Tenancy's)
        self.router = router
        self._tenancy_async = tenancy_async
        #: the first route the session served (its key picks the plain engine)
        self._home: Route | None = None

    def get_bind(
        self,
        mapper: Mapper[Any] | type[Any] | None = None,
        *,
        clause: Any = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """Precedence: an explicit ``bind`` argument; then a connection the testing kit pinned for
        the route (:func:`pin_connection`); then the admin engine inside
        :func:`platform_context`; then the active tenant's placement (the default tenant when none
        is active, or :class:`TenantRequired` when there is no default)."""
        if bind is not None:
            return bind
        route = self._route()
        if _pinned:
            pinned = _pinned.get(route.key)
            if pinned is not None:
                self.join_transaction_mode = "create_savepoint"
                return pinned
        home = self._home
        assert home is not None
        if route is home or route.key == home.key:  # routes are memoised: mostly the same object
            return route.engine(self._tenancy_async)
        return route.alternate(self._tenancy_async)

    def _route(self) -> Route:
        """The current context's route (the first one the session serves is its home)."""
        route = self.router.current()
        if self._home is None:
            self._home = route
        return route

    def _token(self) -> str:
        """The identity token of the current context (see :func:`token_scope`)."""
        return self.router.current().token

    def _identity_lookup(  # type: ignore[override]
        self, mapper: Mapper[Any], primary_key_identity: Any, identity_token: Any = None, **kw: Any
    ) -> Any:
        if identity_token is None:
            parent = kw.get("lazy_loaded_from")
            if parent is not None:  # a many-to-one's target belongs to the parent's tenant
                identity_token = parent.key[2] if parent.key is not None else parent.identity_token
            else:
                identity_token = self._token()
        return super()._identity_lookup(mapper, primary_key_identity, identity_token=identity_token, **kw)

    def _describe(self, token: object) -> str:
        """A tenant named by an identity token, for error messages."""
        if token == "platform":
            return "platform_context()"
        scope = token_scope(token)
        if scope is None:
            return f"no tenant (identity token {token!r})"
        try:
            slug = self.router.get_tenant(scope[0]).slug
        except TenancyError:
            slug = str(scope[0])
        return f"tenant {slug!r}{' (anonymously)' if scope[1] else ''}"

    def _owner_scope(self, owner: object) -> tuple[uuid.UUID, bool] | None:
        """The context to load objects of ``owner`` (an identity token) in: ``None`` when it is
        the current one; :class:`TenancyError` when there is none (platform objects)."""
        try:
            current: Route | None = self.router.current()
        except TenancyError:
            current = None  # no usable context: the load is the owner's all the same
        if current is not None and current.token == owner:
            return None
        scope = token_scope(owner)
        if scope is None:
            here = self._describe(current.token) if current is not None else "no tenant context"
            raise CrossTenantAccess(
                f"An object that belongs to {self._describe(owner)} is being loaded again in {here}. "
                "Load it again inside the context it was loaded in (objects of platform_context() "
                "are loaded again inside platform_context() only)."
            )
        return scope

    def _options(self, execution_options: Any) -> tuple[Any, tuple[uuid.UUID, bool] | None]:
        """The execution options of a statement, tagged with the identity token of the tenant its
        rows are loaded for, and the context to run it in (``None``: the current one)."""
        owner = _load_owner(execution_options)
        if owner is _NOT_A_LOAD:
            if "identity_token" in execution_options:
                return execution_options, None
            return {**execution_options, "identity_token": self._token()}, None
        scope = self._owner_scope(owner)
        if scope is None:
            return execution_options, None
        # No autoflush there: pending changes of the current tenant are not the owner's.
        return {**execution_options, "autoflush": False, "identity_token": owner}, scope

    def execute(
        self,
        statement: Executable,
        params: Any = None,
        *,
        execution_options: Any = util.EMPTY_DICT,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> Result[Any]:
        """:meth:`Session.execute`, for the tenant of the current context; a load SQLAlchemy makes
        for existing objects (expired or deferred attributes, ``refresh()``, relationship loads)
        runs for the objects' own tenant."""
        options, scope = self._options(execution_options)
        if scope is None:
            return super().execute(
                statement, params, execution_options=options, bind_arguments=bind_arguments, **kw
            )
        with tenant_context(scope[0], anonymous=scope[1]):
            return super().execute(
                statement, params, execution_options=options, bind_arguments=bind_arguments, **kw
            )

    def scalars(
        self,
        statement: Executable,
        params: Any = None,
        *,
        execution_options: Any = util.EMPTY_DICT,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> ScalarResult[Any]:
        """:meth:`Session.scalars`, its rows tagged for the tenant of the current context."""
        options, _ = self._options(execution_options)
        return super().scalars(
            statement, params, execution_options=options, bind_arguments=bind_arguments, **kw
        )

    def scalar(
        self,
        statement: Executable,
        params: Any = None,
        *,
        execution_options: Any = util.EMPTY_DICT,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> Any:
        """:meth:`Session.scalar`, its row tagged for the tenant of the current context."""
        options, _ = self._options(execution_options)
        return super().scalar(
            statement, params, execution_options=options, bind_arguments=bind_arguments, **kw
        )


_NOT_A_LOAD = object()


def _load_owner(execution_options: Any) -> object:
    """The identity token of the existing objects a statement loads on behalf of, or
    :data:`_NOT_A_LOAD` for a statement of the application's own.

    SQLAlchemy's own loads pass their loader state in the execution options (what
    ``sqlalchemy.ext.horizontal_shard`` relies on too): a refresh of expired or deferred
    attributes carries the refreshed object's identity token, a lazy load the object it loads
    from, and a post-load (selectin and the like) the top-level query's context, whose token is
    its objects'.
    """
    load = execution_options.get("_sa_orm_load_options")
    if load is not None:
        parent = load._lazy_loaded_from
        if parent is not None:  # the related objects are the parent's tenant's
            return parent.key[2] if parent.key is not None else parent.identity_token
        if load._refresh_state is not None:
            return load._identity_token
    top = execution_options.get("sa_top_level_orm_context")
    if top is not None:
        return top.identity_token
    return _NOT_A_LOAD


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
            raise CrossTenantAccess(
                f"{type(obj).__name__} belongs to {session._describe(owner)} but the session is "
                f"flushing for {session._describe(token)}. Flush (or commit) inside the "
                "tenant_context the object was added or loaded in."
            )
