"""Which tenant a request targets: resolvers that read it from the request, and the decision of
what an unusable answer means, taken before any database connection is checked out.

Resolvers are framework-neutral: they read a :class:`RequestView` (method, path, host, headers and,
once the checkpoint verified a bearer token, its claims) and return a tenant *reference* (a slug or
a UUID string) or ``None`` when the request carries nothing they understand. They are tried in
order; the first that yields a reference wins:

* :class:`HeaderResolver`: a header, ``X-Tenant-ID`` by default;
* :class:`SubdomainResolver`: the label in front of a base domain (``acme.example.com``);
* :class:`PathPrefixResolver`: the path segment after a prefix (``/t/acme/projects``);
* :class:`ClaimResolver`: a claim of the verified bearer token (``tenant`` by default).

:func:`resolve_tenant` turns the reference into a :class:`Tenant` through the registry's cache and
raises the domain error of each unusable outcome, decided before the application's pool is touched
(the integrations answer it as :func:`~sqla_tenancy.checkpoint.http_answer` says):

* no reference, and the Tenancy has a default tenant: the default tenant serves the request;
* no reference and no default tenant: :class:`~sqla_tenancy.TenantRequired`, 400 ``tenant_required``;
* an unknown or malformed reference: :class:`~sqla_tenancy.TenantNotFound`, 404 ``tenant_not_found``;
* a suspended tenant: :class:`~sqla_tenancy.TenantSuspended`, 403 ``tenant_suspended``.

**One tenant per name.** A reference is taken exactly as the request sent it: nothing is stripped,
case-folded, decoded or otherwise normalised between the request and the registry. It names a
tenant only when it *is* that tenant's slug or the canonical string of its id (``str(tenant.id)``:
lower-case, hyphenated); ``"acme\n"``, ``" acme"``, ``"ACME"``, a fullwidth ``"\\uff41cme"``, an
upper-case UUID or ``{uuid}`` name no tenant and are refused, never folded into ``acme``. An empty
reference (an empty ``X-Tenant-ID:`` header, ``/t//...``, a bare ``.example.com`` label) is refused
too: it is not "no reference", which would fall back to the default tenant.

Those are the outcomes for requests whose identity is not in question. The checkpoint
(:mod:`sqla_tenancy.checkpoint`) adds authentication on top and, for unauthenticated requests, folds
"unknown" and "not yours" into one response so that they do not reveal which tenants exist.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import InvalidTenantSlug, TenancyError, TenantNotFound, TenantRequired, TenantSuspended
from .identifiers import validate_slug
from .registry import Tenant
from .routing import lookup_key

if TYPE_CHECKING:
    from .tenancy import Tenancy

__all__ = [
    "DEFAULT_RESOLVERS",
    "ClaimResolver",
    "HeaderResolver",
    "PathPrefixResolver",
    "RequestRejected",
    "RequestView",
    "SubdomainResolver",
    "NO_TENANT_NAMED",
    "TenantNotResolved",
    "TenantResolver",
    "TenantUnavailable",
    "UnknownTenant",
    "default_reference",
    "default_resolvers",
    "ensure_usable",
    "lookup_tenant",
    "registry_key",
    "resolve_reference",
    "resolve_tenant",
]

#: Longer references are refused without asking the registry (a slug is at most 40 characters).
_MAX_REFERENCE_LENGTH = 64


# -- outcomes -------------------------------------------------------------------------------------


class RequestRejected(TenancyError):
    """A request may not proceed for a reason only the request's edge knows (authentication, see
    :mod:`sqla_tenancy.checkpoint`). Resolution itself raises the domain errors
    (:class:`~sqla_tenancy.TenantNotFound`, :class:`~sqla_tenancy.TenantSuspended`,
    :class:`~sqla_tenancy.TenantRequired`); :func:`sqla_tenancy.checkpoint.http_answer` says how
    each is answered.

    ``str(exc)`` is the detailed reason, for logs; ``detail`` is what the client is told, which may
    say less (see :class:`~sqla_tenancy.checkpoint.AuthenticationRequired`).
    """

    def __init__(self, reason: str, *, detail: str | None = None) -> None:
        super().__init__(reason)
        self.detail = detail if detail is not None else reason

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers (``WWW-Authenticate`` for 401 answers)."""
        return {}


#: Former names of the domain errors resolution raises (one concept, one class).
UnknownTenant = TenantNotFound
TenantUnavailable = TenantSuspended
TenantNotResolved = TenantRequired

#: What a request that names no tenant, where no default tenant is configured, is told.
NO_TENANT_NAMED = (
    "The request names no tenant and no default tenant is configured: send the tenant "
    "(e.g. the X-Tenant-ID header) or configure Tenancy(default_tenant=...)."
)


# -- the request, as resolvers see it ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestView:
    """The parts of an HTTP request that tenant resolution reads, whatever the framework.

    ``headers`` are keyed by lower-case name; repeated headers are joined with ``", "`` (so two
    different ``X-Tenant-ID`` values never silently resolve to one of them). ``claims`` are the
    verified bearer token's claims, filled in by the checkpoint (``None``: no verified token).
    """

    method: str
    path: str
    host: str
    headers: Mapping[str, str] = field(default_factory=dict)
    claims: Mapping[str, Any] | None = None

    @classmethod
    def from_pairs(
        cls, method: str, path: str, host: str | None, headers: Iterable[tuple[str, str]]
    ) -> RequestView:
        """Build a view from header (name, value) pairs in any case, repeats allowed. ``host``
        defaults to the ``Host`` header."""
        joined: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        return cls(method=method.upper(), path=path, host=host or joined.get("host", ""), headers=joined)

    def header(self, name: str) -> str | None:
        """The header's value (case-insensitive name), or ``None``."""
        return self.headers.get(name.lower())

    @property
    def is_cors_preflight(self) -> bool:
        """A browser's CORS preflight (``OPTIONS`` with ``Access-Control-Request-Method``): it never
        carries credentials, so the integrations let it through without a tenant."""
        return self.method == "OPTIONS" and "access-control-request-method" in self.headers


class TenantResolver(Protocol):
    """Reads a tenant reference (slug or UUID string) from a request, or ``None`` if it has none.

    Return what the request sent, as it sent it: the registry decides whether it names a tenant.
    Stripping or case-folding here would let two spellings name one tenant.
    """

    def __call__(self, request: RequestView, /) -> str | None: ...


class HeaderResolver:
    """The tenant named in a request header (``X-Tenant-ID`` by default), by slug or UUID.

    The value is returned as received; a header that is present but empty is a reference (to no
    tenant), not a request that names none.
    """

    def __init__(self, header: str = "X-Tenant-ID") -> None:
        self.header = header

    def __call__(self, request: RequestView, /) -> str | None:
        return request.header(self.header)

    def __repr__(self) -> str:
        return f"HeaderResolver({self.header!r})"


#: ``[v6 address]`` with an optional port: never a tenant's host.
_IPV6_HOST = re.compile(r"\[[0-9A-Fa-f:.]*\](?::[0-9]*)?")


class SubdomainResolver:
    """The tenant named by the host's label(s) in front of ``base_domain``.

    ``acme.example.com`` gives ``acme`` for ``base_domain="example.com"``. The port and one
    trailing dot (the DNS root, ``acme.example.com.``) are host syntax and are set aside; the
    base domain is compared case-insensitively (ASCII only). The label is returned exactly as
    sent: ``ACME.example.com`` gives ``ACME``, which names no tenant (it is refused, never folded).
    The bare base domain, a host outside it, an IPv6 literal and the labels in ``ignore`` (``www``
    by default, compared exactly) give ``None``. An empty label (``.example.com``) or several
    labels (``a.b.example.com``) are returned as they are and so resolve to no tenant: a malformed
    host must not fall back to the default tenant.
    """

    def __init__(self, base_domain: str, *, ignore: Iterable[str] = ("www",)) -> None:
        self.suffix = "." + base_domain.strip(".").lower()
        self.ignore = frozenset(ignore)

    def __call__(self, request: RequestView, /) -> str | None:
        host = request.host
        if _IPV6_HOST.fullmatch(host):
            return None
        name, colon, port = host.rpartition(":")
        if colon and (not port or (port.isascii() and port.isdigit())):  # RFC 3986 allows ":"
            host = name
        if host.endswith("."):
            host = host[:-1]
        tail = host[-len(self.suffix) :]
        if len(host) < len(self.suffix) or not tail.isascii() or tail.lower() != self.suffix:
            return None
        label = host[: -len(self.suffix)]
        if label in self.ignore:
            return None
        return label

    def __repr__(self) -> str:
        return f"SubdomainResolver({self.suffix[1:]!r})"


class PathPrefixResolver:
    """The path segment right after ``prefix``: ``/t/acme/projects`` gives ``acme``.

    The segment is returned as it is in the (already percent-decoded) path the framework routes
    on; an empty one (``/t//projects``) is a reference to no tenant. The path is not rewritten:
    routes still declare the segment (``/t/<tenant>/projects``).
    """

    def __init__(self, prefix: str = "/t/") -> None:
        self.prefix = "/" + prefix.strip("/") + "/"

    def __call__(self, request: RequestView, /) -> str | None:
        if not request.path.startswith(self.prefix):
            return None
        return request.path[len(self.prefix) :].split("/", 1)[0]

    def __repr__(self) -> str:
        return f"PathPrefixResolver({self.prefix!r})"


class ClaimResolver:
    """The tenant named by a claim of the verified bearer token (``tenant`` by default).

    Only the checkpoint verifies tokens, so without one (or without a token) this yields nothing;
    nor does a token without the claim. A claim that is present but not a string (a number, a
    list, ``null``) names no tenant: :class:`~sqla_tenancy.TenantNotFound`, rather than the default tenant.
    Put it last to let an explicit header or host win, and the checkpoint refuse a mismatch.
    """

    def __init__(self, claim: str = "tenant") -> None:
        self.claim = claim

    def __call__(self, request: RequestView, /) -> str | None:
        if request.claims is None or self.claim not in request.claims:
            return None
        value = request.claims[self.claim]
        if not isinstance(value, str):
            raise TenantNotFound(value)
        return value

    def __repr__(self) -> str:
        return f"ClaimResolver({self.claim!r})"


#: Used by the integrations when no resolvers are given: a header, then the token's claim.
DEFAULT_RESOLVERS: tuple[TenantResolver, ...] = (HeaderResolver(), ClaimResolver())


# -- resolution -----------------------------------------------------------------------------------


def resolve_reference(request: RequestView, resolvers: Sequence[TenantResolver]) -> str | None:
    """The first reference a resolver yields, or ``None``."""
    for resolver in resolvers:
        ref = resolver(request)
        if ref is not None:
            return ref
    return None


def registry_key(tenancy: Tenancy, ref: str) -> str | uuid.UUID | None:
    """The registry key a client-supplied reference *is*, or ``None`` if it cannot name a tenant.

    Only a canonical reference is a key: a valid slug (the default tenant's included), or the
    canonical string of a UUID, which becomes that UUID. Nothing is stripped or folded, so every
    other spelling gives ``None`` and never reaches the registry."""
    if not isinstance(ref, str) or len(ref) > _MAX_REFERENCE_LENGTH:
        return None
    key = lookup_key(ref)
    if isinstance(key, uuid.UUID):
        return key
    try:
        return validate_slug(key, allow_default=tenancy.default_tenant)
    except InvalidTenantSlug:
        return None


def lookup_tenant(tenancy: Tenancy, ref: str) -> Tenant:
    """The tenant a client-supplied reference names, whatever its status;
    :class:`~sqla_tenancy.TenantNotFound` if the reference is malformed or unknown. Uses the
    registry's cache, not a connection of the application's pool."""
    key = registry_key(tenancy, ref)
    if key is None:
        raise TenantNotFound(ref)
    try:
        return tenancy.get_tenant(key)
    except TenantNotFound:
        raise TenantNotFound(ref) from None


def ensure_usable(tenant: Tenant) -> Tenant:
    """``tenant`` if queries may run for it: :class:`~sqla_tenancy.TenantSuspended` when it is suspended,
    :class:`~sqla_tenancy.TenantNotFound` while it is still being provisioned or deleted."""
    if tenant.status == "active":
        return tenant
    if tenant.status == "suspended":
        raise TenantSuspended(tenant.slug)
    raise TenantNotFound(tenant.slug)


def default_reference(tenancy: Tenancy) -> str:
    """The default tenant's slug; :class:`~sqla_tenancy.TenantRequired` when the Tenancy has none."""
    if tenancy.default_tenant is None:
        raise TenantRequired(NO_TENANT_NAMED)
    return tenancy.default_tenant


def resolve_tenant(tenancy: Tenancy, request: RequestView, resolvers: Sequence[TenantResolver]) -> Tenant:
    """The usable tenant the request targets (the default tenant when it names none).

    Raises :class:`~sqla_tenancy.TenantRequired` (400), :class:`~sqla_tenancy.TenantNotFound`
    (404) or :class:`~sqla_tenancy.TenantSuspended` (403). No authentication happens here: use
    :func:`sqla_tenancy.checkpoint.admit` for that.
    """
    ref = resolve_reference(request, resolvers)
    return ensure_usable(lookup_tenant(tenancy, ref if ref is not None else default_reference(tenancy)))


def default_resolvers(checkpoint: Any = None) -> tuple[TenantResolver, ...]:
    """:data:`DEFAULT_RESOLVERS`, with the claim resolver reading the checkpoint's tenant claim
    (so ``Checkpoint(tenant_claim="org")`` needs no resolver of its own)."""
    claim = getattr(checkpoint, "tenant_claim", None)
    if claim is None or claim == "tenant":
        return DEFAULT_RESOLVERS
    return (HeaderResolver(), ClaimResolver(claim))
