"""The active tenant, held in a context variable.

Threads start with no tenant; asyncio tasks inherit the tenant of the code that created them.
:func:`tenant_context` nests and restores the outer tenant on exit, exceptions included.

To carry the tenant into a thread pool, submit the work through :func:`run_in_context` (or
``contextvars.copy_context().run``): a plain ``executor.submit(fn)`` runs ``fn`` with no tenant,
which fails closed instead of leaking.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, Protocol, TypeVar

from .registry import Tenant

__all__ = [
    "Resolver",
    "active_resolver",
    "current_is_anonymous",
    "current_platform_reason",
    "current_tenant",
    "current_tenant_ref",
    "no_tenant_context",
    "platform_context",
    "run_in_context",
    "set_active_resolver",
    "tenant_context",
]

log = logging.getLogger("sqla_tenancy.platform")

P = ParamSpec("P")
R = TypeVar("R")


class _Scope:
    """One entry of the context: a tenant reference or a platform (cross-tenant) scope."""

    __slots__ = ("key", "platform_reason", "tenant")

    #: whether the tenant is served anonymously (see :class:`_AnonymousScope`)
    anonymous = False
    #: whether the scope refuses every query, default tenant included (see :class:`_NoTenantScope`)
    refuses = False

    def __init__(self, tenant: str | uuid.UUID | Tenant | None, platform_reason: str | None = None):
        self.tenant = tenant
        self.platform_reason = platform_reason
        #: the routing memo's key: the reference itself, or (reference, "anonymous")
        self.key: object = tenant


class _AnonymousScope(_Scope):
    """A tenant served anonymously (its own class keeps the common scope as cheap as before)."""

    __slots__ = ()

    anonymous = True

    def __init__(self, tenant: str | uuid.UUID | Tenant) -> None:
        self.tenant = tenant
        self.platform_reason = None
        self.key = (tenant, "anonymous")


class _NoTenantScope(_Scope):
    """No tenant, and no falling back to the default tenant either (see :func:`no_tenant_context`)."""

    __slots__ = ()

    refuses = True

    def __init__(self, why: str) -> None:
        self.tenant = None
        self.platform_reason = None
        self.key = why


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("sqla_tenancy_scope", default=None)


class tenant_context:
    """Make ``tenant`` (a slug, a UUID or a :class:`Tenant`) the active tenant inside the block.

    The reference is resolved lazily, at the next transaction begin, against the registry; so an
    unknown or suspended tenant raises there (:class:`TenantNotFound` /
    :class:`TenantSuspended`), before any SQL of that transaction is sent. Nests; the outer tenant
    is restored on exit, also on exceptions. (A class rather than a generator: it runs on every
    request.)

    With ``anonymous=True`` the block acts for the tenant as an anonymous caller (a request
    admitted with the tenant's access key, or with no credential): its transactions run as the
    placement's low-privilege anonymous role, which may only read the tables opted in with
    :func:`~sqla_tenancy.models.anonymous_readable` (see :mod:`sqla_tenancy.anonymous`). Its ORM
    objects never share an identity map entry with the same tenant's full-privilege ones.
    """

    __slots__ = ("_scope", "_token")

    def __init__(self, tenant: str | uuid.UUID | Tenant, *, anonymous: bool = False) -> None:
        if not isinstance(tenant, (str, uuid.UUID, Tenant)):
            raise TypeError(
                f"tenant_context() takes a slug, a uuid.UUID or a Tenant, not {type(tenant).__name__}"
            )
        self._scope = _AnonymousScope(tenant) if anonymous else _Scope(tenant)
        self._token: contextvars.Token[_Scope | None] | None = None

    def __enter__(self) -> None:
        if self._token is not None:
            raise RuntimeError("a tenant_context() object cannot be entered twice at once")
        self._token = _scope.set(self._scope)

    def __exit__(self, *exc: object) -> None:
        token, self._token = self._token, None
        assert token is not None
        _scope.reset(token)


@contextmanager
def platform_context(reason: str) -> Iterator[None]:
    """Work across tenants, explicitly and on the record.

    Inside the block a :class:`TenantSession` uses the admin engine (``admin_url``), which is
    expected to bypass row-level security; the entry is logged with ``reason`` on the
    ``sqla_tenancy.platform`` logger so that cross-tenant access is auditable.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("platform_context() needs a non-empty reason, e.g. 'nightly billing run'")
    log.info("entering platform context: %s", reason)
    token = _scope.set(_Scope(None, platform_reason=reason))
    try:
        yield
    finally:
        _scope.reset(token)
        log.debug("left platform context: %s", reason)


class no_tenant_context:
    """Inside the block no tenant is active and the default tenant does not apply either: every
    query raises :class:`~sqla_tenancy.TenantRequired` before any SQL is sent, whatever
    ``Tenancy(default_tenant=...)`` says.

    The web integrations serve requests that skip the checkpoint (CORS preflights, exempt views)
    inside it, so that an unauthenticated request never runs as the default tenant. ``why`` goes
    into the error message. A :func:`tenant_context` or :func:`platform_context` nested inside
    the block applies as usual.
    """

    __slots__ = ("_scope", "_token")

    def __init__(self, why: str = "this code runs outside any tenant") -> None:
        self._scope = _NoTenantScope(why)
        self._token: contextvars.Token[_Scope | None] | None = None

    def __enter__(self) -> None:
        if self._token is not None:
            raise RuntimeError("a no_tenant_context() object cannot be entered twice at once")
        self._token = _scope.set(self._scope)

    def __exit__(self, *exc: object) -> None:
        token, self._token = self._token, None
        assert token is not None
        _scope.reset(token)


def current_scope() -> _Scope | None:
    """The innermost scope (internal: used by :class:`Tenancy` on every transaction)."""
    return _scope.get()


def current_tenant_ref() -> str | uuid.UUID | Tenant | None:
    """The reference passed to the innermost :func:`tenant_context`, unresolved."""
    scope = _scope.get()
    return None if scope is None else scope.tenant


def current_is_anonymous() -> bool:
    """Whether the innermost :func:`tenant_context` acts for its tenant anonymously."""
    scope = _scope.get()
    return scope is not None and scope.anonymous


def current_platform_reason() -> str | None:
    """The reason of the innermost :func:`platform_context`, or ``None`` outside one."""
    scope = _scope.get()
    return None if scope is None else scope.platform_reason


class Resolver(Protocol):
    """What resolves a tenant reference: a Tenancy's router (see :func:`set_active_resolver`)."""

    def get_tenant(self, ref: str | uuid.UUID | Tenant, /) -> Tenant: ...

    def current_tenant_id(self) -> uuid.UUID: ...


_active: weakref.ref[Any] | None = None


def set_active_resolver(resolver: Resolver) -> None:
    """Make ``resolver`` the one :func:`current_tenant` and column defaults use when not told
    which Tenancy to ask: the most recently created Tenancy's (applications have one)."""
    global _active
    _active = weakref.ref(resolver)


def active_resolver() -> Resolver | None:
    """The resolver set last by :func:`set_active_resolver`, if it is still alive."""
    resolver: Resolver | None = _active() if _active is not None else None
    return resolver


def current_tenant(tenancy: Any = None) -> Tenant | None:
    """The active tenant, resolved through the registry, or ``None``.

    ``None`` means no :func:`tenant_context` is active (inside :func:`platform_context` too).
    The default tenant is not returned here: it is what queries fall back to, not what the
    context holds. The reference is resolved with ``tenancy``, or with the most recently created
    :class:`~sqla_tenancy.Tenancy` of the process (applications have one).
    """
    ref = current_tenant_ref()
    if ref is None:
        return None
    resolver = tenancy.router if tenancy is not None else active_resolver()
    if resolver is None:
        if isinstance(ref, Tenant):
            return ref
        raise RuntimeError("current_tenant() needs a Tenancy to resolve a slug or id; none exists")
    return resolver.get_tenant(ref)


def run_in_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``fn`` so that it runs with a copy of the caller's context (tenant included).

    ``executor.submit(run_in_context(work), arg)`` carries the active tenant into a thread pool;
    call it in the submitting thread, at submission time.
    """
    ctx = contextvars.copy_context()

    def runner(*args: P.args, **kwargs: P.kwargs) -> R:
        return ctx.copy().run(fn, *args, **kwargs)

    return runner
