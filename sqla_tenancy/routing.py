"""Resolution of the active context to a :class:`Route`: the tenant, its binding statement, its
engines and its identity token. This runs several times per transaction (``get_bind``, the
dialect's begin, identity-map look-ups), so the result is memoised per reference and re-checked
only when the registry changes or its cache entry expires.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from .binding import ADMIT_FUNCTION, admit_statement, admitted_binding
from .context import _scope
from .errors import (
    InvalidTenantSlug,
    TenantNotFound,
    TenantRequired,
    TenantSuspended,
    UnknownPlacement,
    UnsafeRoleError,
)
from .registry import Registry, Tenant

if TYPE_CHECKING:
    from .config import TenancyConfig
    from .engines import Engines
    from .placements import Placement

__all__ = ["AnonymousRoute", "Route", "Router", "lookup_key", "token_scope"]

#: Where privileges or checks that weaken isolation are reported.
isolation_log = logging.getLogger("sqla_tenancy.isolation")

_ANONYMOUS_SUFFIX = ":anonymous"


_current_scope = _scope.get


class Route:
    """Where the current context's statements go, and how their transactions are bound."""

    __slots__ = (
        "_alternates",
        "_engines",
        "_epochs",
        "_per_tenant",
        "binding",
        "engines",
        "key",
        "placement",
        "tenant",
        "token",
    )

    def __init__(
        self,
        engines: Engines,
        tenant: Tenant | None,
        placement: Placement | None,
        binding: bytes | None,
    ) -> None:
        self.engines = engines
        self.tenant = tenant
        self.placement = placement
        #: the ``SET LOCAL`` statements sent with ``BEGIN`` (None: an unbound transaction)
        self.binding = binding
        #: identity-map token: the tenant's id, or "platform"
        self.token = str(tenant.id) if tenant is not None else "platform"
        self.key: object = tenant.id if tenant is not None else "platform"
        self._engines: dict[bool, Engine] = {}
        self._alternates: dict[bool, Engine] = {}
        # per-tenant engines belong to the engine cache (bounded): one is kept here only while the
        # cache's epoch says it is still the cache's
        self._per_tenant = bool(placement is not None and placement.per_tenant_engines)
        self._epochs: dict[bool, int] = {}

    def engine(self, async_: bool) -> Engine:
        """The (sync) engine for this route; the async engine's ``sync_engine`` when ``async_``."""
        engine = self._engines.get(async_)
        if not self._per_tenant:
            if engine is not None:
                return engine
        else:
            assert self.tenant is not None and self.placement is not None
            cache = self.engines.tenants
            if engine is not None and self._epochs.get(async_) == cache.epoch:
                cache.touch(self.engines.tenant_key(self.tenant.id, async_))
                return engine
            epoch = cache.epoch  # read first: an eviction during the look-up invalidates it
            engine = self.placement.engine(self.tenant, async_=async_)
            self._engines[async_], self._epochs[async_] = engine, epoch
            return engine
        if self.tenant is None or self.placement is None:
            engine = self.engines.platform(async_)
        else:
            engine = self.placement.engine(self.tenant, async_=async_)
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

    def __init__(self, engines: Engines, tenant: Tenant, placement: Placement, binding: bytes) -> None:
        super().__init__(engines, tenant, placement, binding)
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
    """Resolves the active context for one :class:`~sqla_tenancy.Tenancy`: the tenant (through the
    registry), its placement (from ``placements``, by the tenant's ``strategy``) and the route.

    The application role is checked once, before the first resolution: a role that row-level
    security would not restrain is refused (:class:`UnsafeRoleError`).
    """

    def __init__(
        self,
        config: TenancyConfig,
        registry: Registry,
        engines: Engines,
        placements: Mapping[str, Placement],
    ) -> None:
        self.config = config
        self.registry = registry
        self.placements = placements
        self.platform = Route(engines, None, None, None)
        self._engines = engines
        self._routes: dict[uuid.UUID, Route] = {}
        self._anonymous_routes: dict[uuid.UUID, AnonymousRoute] = {}
        # reference (slug, UUID, Tenant or None for the default; (reference, "anonymous") for an
        # anonymous scope) -> (generation, expiry, route)
        self._memo: dict[object, tuple[int, float, Route]] = {}
        self._role_checked = False
        #: whether bindings of main-database tenants are admitted (tenancy.admit() or admit_tenant())
        self._admit = False
        #: whether the admission checks the placement too (tenancy.admit_tenant(uuid, text))
        self._admit_placement = False
        #: whether the admission is CALLed (the procedure tenancy.admit(uuid, text) exists)
        self._admit_call = False

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
        registry = self.registry
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

    def release_stopped(self, tenant_id: uuid.UUID | None) -> None:
        """Drop the pooled engines of tenants that may no longer be served (deleted, suspended,
        being deleted): called on the registry listener's thread when another process changed
        ``tenant_id`` (``None``: any tenant). Their idle connections close now, checked-out
        ones when returned, so that no process keeps a stopped tenant's connections open."""
        cache = self._engines.tenants
        held = {key[0] for key in cache.held_keys() if isinstance(key, tuple)}
        stopped = set()
        for candidate in held if tenant_id is None else held & {tenant_id}:
            try:
                serving = self.registry.get(candidate).status == "active"
            except TenantNotFound:
                serving = False
            if not serving:
                stopped.add(candidate)
        if stopped:
            cache.discard(lambda key: isinstance(key, tuple) and key[0] in stopped)

    def resolve(self, ref: str | uuid.UUID | Tenant | None) -> Tenant:
        route = self._resolve(ref)[0]
        assert route.tenant is not None
        return route.tenant

    def _resolve(
        self, ref: str | uuid.UUID | Tenant | None, *, anonymous: bool = False
    ) -> tuple[Route, float]:
        if not self._role_checked:
            self.check_app_role()
            self._admit = self.registry.admits_tenants()
            self._admit_placement = self._admit and self.registry.admits_placements()
            self._admit_call = self._admit_placement and self.registry.admits_by_call()
            if not self._admit:
                isolation_log.warning(
                    "The main database lacks %s(uuid): transactions of shared and schema tenants "
                    "are admitted by this process's registry cache alone, so a deletion cannot "
                    "wait for them. Run tenancy.install() (idempotent) to create it.",
                    ADMIT_FUNCTION,
                )
            self._role_checked = True
        if ref is None:
            if self.config.default_tenant is None:
                raise TenantRequired()
            ref = self.config.default_tenant
        tenant, expires = self.registry.get_entry(lookup_key(ref))
        if tenant.status != "active":
            if tenant.status == "suspended":
                raise TenantSuspended(tenant.slug)
            raise TenantNotFound(ref if not isinstance(ref, Tenant) else ref.slug)
        if anonymous:
            return self._anonymous_route(tenant), expires
        route = self._routes.get(tenant.id)
        if route is None or route.tenant != tenant:
            placement = self.placement_of(tenant)
            route = Route(
                self._engines, tenant, placement, self._admitted(placement, tenant, placement.binding(tenant))
            )
            if len(self._routes) > 10_000:
                self._routes.clear()
            self._routes[tenant.id] = route
        return route, expires

    def _anonymous_route(self, tenant: Tenant) -> AnonymousRoute:
        route = self._anonymous_routes.get(tenant.id)
        if route is None or route.tenant != tenant:
            placement = self.placement_of(tenant)
            binding = self._admitted(placement, tenant, placement.anonymous_binding(tenant))
            route = AnonymousRoute(self._engines, tenant, placement, binding)
            if len(self._anonymous_routes) > 10_000:
                self._anonymous_routes.clear()
            self._anonymous_routes[tenant.id] = route
        return route

    def _admitted(self, placement: Placement, tenant: Tenant, binding: bytes) -> bytes:
        """``binding``, preceded by the admission check when the placement's transactions run in
        the main database (see :func:`~sqla_tenancy.binding.admit_statement`)."""
        if self._admit and placement.admitted:
            where = placement.name if self._admit_placement else None
            admission = admit_statement(
                tenant.id, placement=where, distributed=self.config.distributed, call=self._admit_call
            )
            return admitted_binding(admission, binding)
        return binding

    def binding(self) -> bytes | None:
        """The dialect's binder: the current route's ``SET LOCAL`` statements."""
        return self.current().binding

    def current_tenant_id(self) -> uuid.UUID:
        """The id of the tenant the current context's transactions are bound to (what a
        ``tenant_id`` column defaults to); :class:`TenantRequired` inside ``platform_context()``."""
        tenant = self.current().tenant
        if tenant is None:
            raise TenantRequired(
                "Inside platform_context() no tenant is active: set tenant_id explicitly on rows "
                "written for a tenant, or write them inside tenant_context(<slug>)."
            )
        return tenant.id

    def get_tenant(self, ref: str | uuid.UUID | Tenant) -> Tenant:
        """The tenant ``ref`` names, whatever its status (:class:`TenantNotFound`)."""
        return self.registry.get(lookup_key(ref))

    def placement_of(self, tenant: Tenant) -> Placement:
        """The placement serving ``tenant`` (:class:`UnknownPlacement` if there is none)."""
        try:
            return self.placements[tenant.strategy]
        except KeyError:
            raise UnknownPlacement(tenant.strategy, list(self.placements), tenant=tenant.slug) from None

    def check_app_role(self) -> None:
        """Refuse an application role that row-level security would not restrain."""
        superuser, bypass = self.registry.role_attributes()
        if (superuser or bypass) and not self.config.allow_bypassrls:
            raise UnsafeRoleError(
                f"The application role {self.config.app_role!r} is "
                f"{'a superuser' if superuser else 'BYPASSRLS'}, so row-level security would not "
                "isolate tenants. Connect `url` as a NOSUPERUSER NOBYPASSRLS role (keep the "
                "privileged one for admin_url), or pass allow_bypassrls=True in development."
            )


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
