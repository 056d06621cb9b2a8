"""Resolution of the active context to a :class:`Route`: the tenant, its binding statement, its
engines and its identity token. This runs several times per transaction (``get_bind``, the
dialect's begin, identity-map look-ups), so the result is memoised per reference and re-checked
only when the registry changes or its cache entry expires.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from .context import _scope
from .errors import InvalidTenantSlug, TenantNotFound, TenantRequired, TenantSuspended
from .registry import Tenant

if TYPE_CHECKING:
    from .strategies import Strategy
    from .tenancy import Tenancy

__all__ = ["AnonymousRoute", "Route", "Router", "lookup_key", "token_scope"]

_ANONYMOUS_SUFFIX = ":anonymous"


_current_scope = _scope.get


class Route:
    """Where the current context's statements go, and how their transactions are bound."""

    __slots__ = (
        "_alternates",
        "_engines",
        "_per_tenant",
        "binding",
        "key",
        "strategy",
        "tenancy",
        "tenant",
        "token",
    )

    def __init__(
        self,
        tenancy: Tenancy,
        tenant: Tenant | None,
        strategy: Strategy | None,
        binding: bytes | None,
    ) -> None:
        self.tenancy = tenancy
        self.tenant = tenant
        self.strategy = strategy
        #: the ``SET LOCAL`` statements sent with ``BEGIN`` (None: an unbound transaction)
        self.binding = binding
        #: identity-map token: the tenant's id, or "platform"
        self.token = str(tenant.id) if tenant is not None else "platform"
        self.key: object = tenant.id if tenant is not None else "platform"
        self._engines: dict[bool, Engine] = {}
        self._alternates: dict[bool, Engine] = {}
        # the engine cache decides for per-tenant engines (LRU): never pin one on the route
        self._per_tenant = bool(strategy is not None and strategy.per_tenant_engines)

    def engine(self, async_: bool) -> Engine:
        """The (sync) engine for this route; the async engine's ``sync_engine`` when ``async_``."""
        engine = self._engines.get(async_)
        if engine is not None:
            return engine
        if self._per_tenant:
            assert self.tenant is not None and self.strategy is not None
            return self.strategy.engine(self.tenancy, self.tenant, async_=async_)
        if self.tenant is None or self.strategy is None:
            engine = self.tenancy.async_admin_engine.sync_engine if async_ else self.tenancy.admin_engine
        else:
            engine = self.strategy.engine(self.tenancy, self.tenant, async_=async_)
        self._engines[async_] = engine
        return engine

    def alternate(self, async_: bool) -> Engine:
        """A bind distinct from every other tenant's, for a session serving several tenants, so
        that it holds one connection (and one binding) per tenant."""
        if self._per_tenant:
            return self.engine(async_)  # already distinct per tenant
        engine = self._alternates.get(async_)
        if engine is None:
            engine = self._alternates[async_] = self.engine(async_).execution_options(
                sqla_tenancy_route=self.token
            )
        return engine


class AnonymousRoute(Route):
    """The route of an anonymous scope: the tenant's placement, entered as its anonymous role
    (see :mod:`sqla_tenancy.anonymous`).

    Its key and identity token are its own (``"<tenant id>:anonymous"``), so a session holds the
    anonymous and the full-privilege transactions of one tenant on separate connections, and
    their objects in separate identity-map entries.
    """

    __slots__ = ("_distinct",)

    def __init__(self, tenancy: Tenancy, tenant: Tenant, strategy: Strategy, binding: bytes) -> None:
        super().__init__(tenancy, tenant, strategy, binding)
        self.token = f"{tenant.id}{_ANONYMOUS_SUFFIX}"
        self.key = (tenant.id, "anonymous")
        self._distinct: dict[bool, tuple[Engine, Engine]] = {}

    def engine(self, async_: bool) -> Engine:
        engine = super().engine(async_)
        if not self._per_tenant:
            return engine
        # A database tenant's engine serves its full-privilege route too: anonymous transactions
        # get a bind of their own (kept while the cache keeps the engine).
        distinct = self._distinct.get(async_)
        if distinct is None or distinct[0] is not engine:
            distinct = (engine, engine.execution_options(sqla_tenancy_route=self.token))
            self._distinct[async_] = distinct
        return distinct[1]


class Router:
    """Resolves the active context for one :class:`Tenancy`."""

    def __init__(self, tenancy: Tenancy) -> None:
        self.tenancy = tenancy
        self.platform = Route(tenancy, None, None, None)
        self._routes: dict[uuid.UUID, Route] = {}
        self._anonymous_routes: dict[uuid.UUID, AnonymousRoute] = {}
        # reference (slug, UUID, Tenant or None for the default; (reference, "anonymous") for an
        # anonymous scope) -> (generation, expiry, route)
        self._memo: dict[object, tuple[int, float, Route]] = {}
        self._role_checked = False

    def current(self) -> Route:
        """The route of the current context (the default tenant's when no tenant is active)."""
        scope = _current_scope()
        ref: object
        if scope is None:
            ref = None
        elif scope.platform_reason is not None:
            return self.platform
        elif scope.refuses:
            raise TenantRequired(
                f"No tenant may serve this code ({scope.key}): it runs inside no_tenant_context(), "
                "where the default tenant does not apply. Enter tenant_context(<slug>) or "
                "platform_context(reason) around the queries that need one."
            )
        else:
            ref = scope.key  # the reference, or (reference, "anonymous")
        memo = self._memo.get(ref)
        registry = self.tenancy.registry
        if memo is not None and memo[0] == registry.generation and memo[1] > time.monotonic():
            route: Route = memo[2]
            return route
        generation = registry.generation
        if scope is None:
            route, expires = self._resolve(None)
        else:
            route, expires = self._resolve(scope.tenant, anonymous=scope.anonymous)
        if len(self._memo) > 10_000:
            self._memo.clear()
        self._memo[ref] = (generation, expires, route)
        return route

    def resolve(self, ref: str | uuid.UUID | Tenant | None) -> Tenant:
        route = self._resolve(ref)[0]
        assert route.tenant is not None
        return route.tenant

    def _resolve(
        self, ref: str | uuid.UUID | Tenant | None, *, anonymous: bool = False
    ) -> tuple[Route, float]:
        if not self._role_checked:
            self.tenancy._check_app_role()
            self._role_checked = True
        if ref is None:
            if self.tenancy.default_tenant is None:
                raise TenantRequired()
            ref = self.tenancy.default_tenant
        tenant, expires = self.tenancy.registry.get_entry(lookup_key(ref))
        if tenant.status != "active":
            if tenant.status == "suspended":
                raise TenantSuspended(tenant.slug)
            raise TenantNotFound(ref if not isinstance(ref, Tenant) else ref.slug)
        if anonymous:
            return self._anonymous_route(tenant), expires
        route = self._routes.get(tenant.id)
        if route is None or route.tenant != tenant:
            strategy = self.tenancy._strategy(tenant)
            route = Route(self.tenancy, tenant, strategy, strategy.binding(self.tenancy, tenant))
            if len(self._routes) > 10_000:
                self._routes.clear()
            self._routes[tenant.id] = route
        return route, expires

    def _anonymous_route(self, tenant: Tenant) -> AnonymousRoute:
        route = self._anonymous_routes.get(tenant.id)
        if route is None or route.tenant != tenant:
            strategy = self.tenancy._strategy(tenant)
            route = AnonymousRoute(
                self.tenancy, tenant, strategy, strategy.anonymous_binding(self.tenancy, tenant)
            )
            if len(self._anonymous_routes) > 10_000:
                self._anonymous_routes.clear()
            self._anonymous_routes[tenant.id] = route
        return route

    def binding(self) -> bytes | None:
        """The dialect's binder: the current route's ``SET LOCAL`` statements."""
        return self.current().binding


def token_scope(token: object) -> tuple[uuid.UUID, bool] | None:
    """The tenant id an identity token names and whether it is the tenant's anonymous scope;
    ``None`` for the platform's token or anything that is not a route's token."""
    if not isinstance(token, str):
        return None
    anonymous = token.endswith(_ANONYMOUS_SUFFIX)
    try:
        return uuid.UUID(token[: -len(_ANONYMOUS_SUFFIX)] if anonymous else token), anonymous
    except ValueError:
        return None


def lookup_key(ref: str | uuid.UUID | Tenant) -> str | uuid.UUID:
    """A registry key for a slug, a UUID (or its canonical string form) or a :class:`Tenant`."""
    if isinstance(ref, Tenant):
        return ref.id
    if isinstance(ref, uuid.UUID):
        return ref
    if isinstance(ref, str):
        # Only the canonical form (``str(uuid)``: lower-case, hyphenated) names a tenant by id;
        # anything else stays a string, which no slug matches (never folded into an id).
        if len(ref) == 36 and ref.count("-") == 4:
            try:
                key = uuid.UUID(ref)
            except ValueError:
                return ref
            if str(key) == ref:
                return key
        return ref
    raise InvalidTenantSlug(f"A tenant is named by a slug, a UUID or a Tenant, not {type(ref).__name__}")
