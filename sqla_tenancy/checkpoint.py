"""The checkpoint: every request proves which tenant it may act for before it reaches a view.

A request is admitted for a tenant in one of three ways:

* **A bearer token** (``Authorization: Bearer <jwt>``), the "passport": verified by a
  :class:`JWTVerifier` (signature with the configured key and algorithms only, ``exp``/``nbf``,
  ``aud``/``iss`` when configured). Its tenant claim (``tenant`` by default; slug or UUID) names the
  tenant the bearer belongs to. When the request also targets a tenant (header, subdomain, path),
  both must be the same tenant, compared by id, or the answer is 403 and no query runs.
* **The tenant's access key** (``X-Tenant-Access-Key: <uuid>``), for anonymous access to a tenant's
  public data: a random UUID issued by :func:`issue_access_key` and shown once; the registry keeps
  only its SHA-256 hash, which the application role cannot read. It routes; it does not
  authenticate a person. Such requests are marked :attr:`Admission.is_anonymous`.
* **Nothing**, when the checkpoint is built with ``require_auth=False`` (single-tenant apps, public
  sites): the request proceeds for the tenant it targets, anonymously.

What each refusal looks like (JSON ``{"error": <code>, "detail": <text>}``):

* invalid bearer token (signature, algorithm, expiry, audience, issuer, format): 401
  ``invalid_token``; decided before any tenant is looked up;
* token valid, targeting another tenant than its claim (or carrying no claim): 403 ``tenant_mismatch``;
* token valid, its own tenant unknown (e.g. deleted since): 404 ``tenant_not_found``;
* token or access key valid, tenant suspended: 403 ``tenant_suspended``;
* no tenant named and no default tenant: 400 ``tenant_required``;
* **unauthenticated** (no token; access key missing, wrong or for an unknown tenant): 401
  ``unauthorized``, with the same body whether the tenant exists or not, so that anonymous callers
  cannot enumerate tenants.

With ``require_auth=False`` an unauthenticated request without an access key is answered like a
request whose identity is not in question (see :mod:`sqla_tenancy.resolvers`): unknown 404,
suspended 403.

**Exact names only.** The tenant claim, the target and the access key are taken exactly as sent:
a claim of ``"acme\n"`` or ``"ACME"`` is not ``acme`` (see :mod:`sqla_tenancy.resolvers`), and an
access key must be the canonical string of its UUID (lower-case, hyphenated; no braces, ``urn:``
prefix or surrounding blanks).

**Database role.** A request admitted by a verified token runs with the tenant's full database role;
one admitted by an access key or with no credential (:attr:`Admission.database_role` ``"anonymous"``)
runs inside ``tenant_context(tenant, anonymous=True)``, as the placement's anonymous role, which may
only read the tables the application opted in (:func:`~sqla_tenancy.models.anonymous_readable`) and
never write (see :mod:`sqla_tenancy.anonymous`). :func:`admit` without a checkpoint (the
application authenticates elsewhere) keeps the full role.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from .context import tenant_context
from .errors import (
    ConfigurationError,
    TenancyError,
    TenantNotFound,
    TenantRefused,
    TenantRequired,
    TenantSuspended,
)
from .registry import Tenant, access_key_hash
from .resolvers import (
    DEFAULT_RESOLVERS,
    RequestRejected,
    RequestView,
    TenantResolver,
    UnknownTenant,
    default_reference,
    ensure_usable,
    lookup_tenant,
    registry_key,
    resolve_reference,
    resolve_tenant,
)
from .routing import lookup_key

if TYPE_CHECKING:
    from .tenancy import Tenancy

__all__ = [
    "AccessKeyNotRetrievable",
    "HttpAnswer",
    "Admission",
    "AuthenticationRequired",
    "Checkpoint",
    "CheckpointConfigError",
    "InvalidToken",
    "JWTVerifier",
    "TenantMismatch",
    "admit",
    "bearer_token",
    "http_answer",
    "issue_access_key",
    "revoke_access_key",
    "rotate_access_key",
    "verify_access_key",
]

log = logging.getLogger(__name__)

#: Signature families; a verifier accepts algorithms of one family only (no algorithm confusion).
_FAMILIES = {
    **dict.fromkeys(("HS256", "HS384", "HS512"), "hmac"),
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "rsa"),
    **dict.fromkeys(("ES256", "ES256K", "ES384", "ES512", "ES521"), "ec"),
    "EdDSA": "okp",
}
#: RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MAX_TOKEN_LENGTH = 8192
#: RFC 7235 token68, the form of a bearer token's credentials (a JWT is a subset of it).
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


# -- errors ---------------------------------------------------------------------------------------


class CheckpointConfigError(ConfigurationError):
    """The checkpoint or verifier is configured in a way that would be unsafe or unusable."""


class AuthenticationRequired(RequestRejected):
    """An unauthenticated request may not proceed (401).

    The client is told the same thing whatever the reason (no credential, wrong access key, unknown
    tenant), so that it cannot learn which tenants exist; the reason is in ``str(exc)`` for logs.
    """

    DETAIL = "Authenticate with a bearer token, or present the tenant's access key."

    def __init__(self, reason: str) -> None:
        super().__init__(reason, detail=self.DETAIL)

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class InvalidToken(RequestRejected):
    """The bearer token failed verification (401): bad signature or algorithm, expired, not yet
    valid, wrong audience or issuer, or malformed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Bearer token rejected: {reason}", detail="The bearer token is not valid.")

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class AccessKeyNotRetrievable(TenancyError):
    """Access keys are stored hashed: an issued key cannot be read back, only replaced."""


class TenantMismatch(RequestRejected):
    """The verified token belongs to another tenant than the one the request targets (403)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, detail="This token does not grant access to the requested tenant.")


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What a refused request is answered: a status, a JSON body, extra headers."""

    status: int
    code: str
    detail: str
    headers: Mapping[str, str]

    def body(self) -> dict[str, str]:
        """``{"error": <code>, "detail": <detail>}``."""
        return {"error": self.code, "detail": self.detail}


#: How each refusal is answered: the one table from errors to HTTP. ``None`` as the detail: the
#: exception's own (``RequestRejected.detail``, else its message).
_ANSWERS: dict[type[TenancyError], tuple[int, str, str | None]] = {
    TenantRequired: (400, "tenant_required", None),
    TenantNotFound: (404, "tenant_not_found", "Unknown tenant."),
    TenantSuspended: (403, "tenant_suspended", "This tenant is suspended."),
    TenantRefused: (403, "tenant_unavailable", "This tenant is not available."),
    AuthenticationRequired: (401, "unauthorized", None),
    InvalidToken: (401, "invalid_token", None),
    TenantMismatch: (403, "tenant_mismatch", None),
}


def http_answer(exc: BaseException) -> HttpAnswer | None:
    """The answer to a request refused with ``exc``; ``None`` when ``exc`` is no refusal (an error
    to let through)."""
    for cls in type(exc).__mro__:
        entry = _ANSWERS.get(cls)
        if entry is not None:
            status, code, detail = entry
            if detail is None:
                detail = exc.detail if isinstance(exc, RequestRejected) else str(exc)
            headers = exc.headers if isinstance(exc, RequestRejected) else {}
            return HttpAnswer(status, code, detail, headers)
    return None


# -- token verification -----------------------------------------------------------------------------


def _import_jwt() -> Any:
    try:
        import jwt
    except ImportError:  # pragma: no cover - depends on the installation
        raise CheckpointConfigError(
            "Bearer-token verification needs PyJWT: pip install 'sqla-tenancy[jwt]'."
        ) from None
    return jwt


class JWTVerifier:
    """Verifies bearer tokens with explicitly configured keys and algorithms (PyJWT).

    :param key: the HMAC secret (``HS*``, at least as many bytes as the hash) or the public key
        (``RS*``/``PS*``/``ES*``/``EdDSA``; PEM text or a ``cryptography`` key; a private key is
        reduced to its public half).
    :param keys: instead of ``key``, keys by ``kid`` (key rotation): a token must name one of them in
        its header.
    :param algorithms: the accepted algorithms, all of one family; ``none`` is never accepted. A
        token's header cannot choose another family, so a public key is never used as an HMAC
        secret (algorithm confusion).
    :param audience: when given, the ``aud`` claim must match; when not, tokens carrying ``aud`` are
        refused (they were issued for some other service).
    :param issuer: when given, the ``iss`` claim must match.
    :param leeway: seconds of clock skew tolerated for ``exp``, ``nbf`` and ``iat``.
    :param require: claims that must be present (``exp`` by default: no token lives forever).
    """

    def __init__(
        self,
        key: Any = None,
        *,
        algorithms: Sequence[str],
        keys: Mapping[str, Any] | None = None,
        audience: str | Sequence[str] | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        require: Sequence[str] = ("exp",),
    ) -> None:
        self._jwt = _import_jwt()
        if isinstance(algorithms, str):
            raise CheckpointConfigError(f"algorithms must be a list, e.g. [{algorithms!r}]")
        self.algorithms = list(algorithms)
        if not self.algorithms:
            raise CheckpointConfigError("JWTVerifier needs at least one algorithm, e.g. ['HS256'].")
        unknown = [a for a in self.algorithms if a not in _FAMILIES]
        if unknown:
            raise CheckpointConfigError(
                f"Algorithm(s) {unknown} are not accepted (never 'none'); choose from "
                f"{', '.join(sorted(_FAMILIES))}."
            )
        families = {_FAMILIES[a] for a in self.algorithms}
        if len(families) != 1:
            raise CheckpointConfigError(
                f"Algorithms {self.algorithms} mix signature families ({', '.join(sorted(families))}); "
                "a verifier takes one family, so that a token cannot pick how its key is used. "
                "Use one verifier per key type."
            )
        if (key is None) == (keys is None):
            raise CheckpointConfigError("Give JWTVerifier either key=... or keys={kid: key, ...}.")
        self._key = self._prepare(key) if key is not None else None
        self._keys = {kid: self._prepare(k) for kid, k in keys.items()} if keys is not None else None
        if self._keys is not None and not self._keys:
            raise CheckpointConfigError("keys={} holds no key.")
        self.audience = audience
        self.issuer = issuer
        self.leeway = float(leeway)
        self.require = list(require)

    def _prepare(self, key: Any) -> Any:
        jwt = self._jwt
        if isinstance(key, str | bytes) and _FAMILIES[self.algorithms[0]] == "hmac":
            secret = key.encode() if isinstance(key, str) else key
            shortest = max(_HMAC_MIN_BYTES[a] for a in self.algorithms)
            if len(secret) < shortest:
                raise CheckpointConfigError(
                    f"The HMAC secret is {len(secret)} bytes; {'/'.join(self.algorithms)} needs at "
                    f"least {shortest} random bytes (e.g. secrets.token_bytes({shortest}))."
                )
        try:
            prepared = jwt.get_algorithm_by_name(self.algorithms[0]).prepare_key(key)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise CheckpointConfigError(
                f"The key does not suit {self.algorithms[0]}: {exc}. Give an HMAC secret for HS*, "
                "or the issuer's public key (PEM) for RS*/PS*/ES*/EdDSA."
            ) from exc
        public_key = getattr(prepared, "public_key", None)
        return public_key() if callable(public_key) else prepared

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; :class:`InvalidToken` if anything about it is wrong."""
        jwt = self._jwt
        if len(token) > _MAX_TOKEN_LENGTH:
            raise InvalidToken(f"token longer than {_MAX_TOKEN_LENGTH} characters")
        try:
            if self._keys is not None:
                kid = jwt.get_unverified_header(token).get("kid")
                key = self._keys.get(kid) if isinstance(kid, str) else None
                if key is None:
                    raise InvalidToken(f"unknown key id {kid!r}")
            else:
                key = self._key
            required = [*self.require]
            if self.audience is not None:
                required.append("aud")
            if self.issuer is not None:
                required.append("iss")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": required},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"{type(exc).__name__}: {exc}") from None
        except (ValueError, TypeError) as exc:  # malformed input deep in a key library
            raise InvalidToken(f"malformed token ({type(exc).__name__})") from None
        return claims


def bearer_token(request: RequestView) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; ``None`` for no header or another
    scheme.

    Read as RFC 6750 writes it: the scheme (any case) at the start, one or more spaces, then the
    token, which must be a token68 (``A-Z a-z 0-9 - . _ ~ + /``, then ``=`` padding) and nothing
    else: an empty token, or one with whitespace or other characters around or inside it, is an
    :class:`InvalidToken` rather than something to clean up. (HTTP servers drop the blanks around
    a header's value themselves.)"""
    value = request.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if not scheme.isascii() or scheme.lower() != "bearer":
        return None
    token = token.lstrip(" ")
    if not token:
        raise InvalidToken("empty bearer token")
    if _TOKEN68.fullmatch(token) is None:
        raise InvalidToken("malformed bearer token (not a token68)")
    return token


# -- access keys ----------------------------------------------------------------------------------


def _canonical_uuid(value: object) -> uuid.UUID | None:
    """``value`` as a UUID if it is exactly a UUID's canonical string (``str(uuid)``), else None."""
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return parsed if str(parsed) == value else None


def _key_owner(tenancy: Tenancy, key: uuid.UUID) -> tuple[uuid.UUID, str] | None:
    """The (id, slug) of the tenant whose access key is ``key``, or None. One query, whatever
    the key and whichever tenant the caller hoped it opens: an unknown tenant and a wrong key do
    the same work. The comparison happens on the stored hash, in the database."""
    with tenancy.admin_engine.connect() as conn:
        return tenancy.store.access_key_owner(conn, key)


def _opens(tenancy: Tenancy, ref: str | uuid.UUID, key: uuid.UUID) -> bool:
    owner = _key_owner(tenancy, key)
    return owner is not None and ref in owner


def get_access_key(tenancy: Tenancy, tenant: str | uuid.UUID | Tenant) -> uuid.UUID:
    """Removed: access keys are stored hashed and cannot be read back. Always raises
    :class:`AccessKeyNotRetrievable`; :func:`issue_access_key` gives the tenant a new key (shown
    once, the old one stops working)."""
    raise AccessKeyNotRetrievable(
        f"Access keys are stored hashed, so the key of tenant {tenant!r} cannot be read back. "
        "Issue a new one with sqla_tenancy.checkpoint.issue_access_key(tenancy, tenant) (it is "
        "returned once; the previous key stops working) and hand it to the tenant's front end."
    )


def verify_access_key(tenancy: Tenancy, tenant: str | uuid.UUID | Tenant, presented: str) -> bool:
    """True when ``presented`` is exactly the canonical string (``str(key)``) of the tenant's
    current access key. A presented value that is not a canonical UUID string gives ``False``
    without a query; any other gives it after the same single query, whether the tenant exists,
    has no key, or has another one."""
    candidate = _canonical_uuid(presented)
    if candidate is None:
        return False
    return _opens(tenancy, lookup_key(tenant), candidate)


def _store_key_hash(tenancy: Tenancy, tenant: str | uuid.UUID | Tenant, digest: bytes | None) -> None:
    """Set (or, with ``None``, clear) the tenant's stored access key hash; :class:`TenantNotFound`
    if there is no such tenant."""
    with tenancy.admin_engine.begin() as conn:
        found = tenancy.store.set_access_key_hash(conn, lookup_key(tenant), digest)
    if not found:
        raise TenantNotFound(tenant)


def issue_access_key(tenancy: Tenancy, tenant: str | uuid.UUID | Tenant) -> uuid.UUID:
    """Give the tenant a new random access key and return it: the only time it is seen, since the
    registry keeps its hash only. Any previous key stops working at once in every process (keys
    are not cached). :class:`TenantNotFound` if there is no such tenant."""
    key = uuid.uuid4()  # 122 random bits from os.urandom
    _store_key_hash(tenancy, tenant, access_key_hash(key))
    log.info("issued a new access key for tenant %s", lookup_key(tenant))
    return key


def rotate_access_key(tenancy: Tenancy, tenant: str | uuid.UUID | Tenant) -> uuid.UUID:
    """:func:`issue_access_key` under the name of what it does to an existing key."""
    return issue_access_key(tenancy, tenant)


def revoke_access_key(tenancy: Tenancy, tenant: str | uuid.UUID | Tenant) -> None:
    """Take the tenant's access key away: no key admits requests for it until one is issued
    again. :class:`TenantNotFound` if there is no such tenant."""
    _store_key_hash(tenancy, tenant, None)
    log.info("revoked the access key of tenant %s", lookup_key(tenant))


# -- admission ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """Why a request may act for ``tenant``: what the integrations keep for the request."""

    tenant: Tenant
    #: "token" (a verified bearer token), "access_key" (the tenant's public key) or "none"
    credential: Literal["token", "access_key", "none"]
    #: the verified token's claims (``None`` unless ``credential == "token"``)
    claims: Mapping[str, Any] | None = None
    #: the database role the request's queries run with: ``"full"`` (the tenant's) or
    #: ``"anonymous"`` (reads of opted-in tables only). By default ``"full"`` for a token and
    #: ``"anonymous"`` otherwise; :func:`admit` without a checkpoint gives ``"full"``.
    database_role: Literal["full", "anonymous"] | None = None

    def __post_init__(self) -> None:
        if self.database_role is None:
            role = "full" if self.credential == "token" else "anonymous"
            object.__setattr__(self, "database_role", role)
        elif self.database_role not in ("full", "anonymous"):
            raise ValueError(f"database_role must be 'full' or 'anonymous', not {self.database_role!r}")

    @property
    def is_anonymous(self) -> bool:
        """True unless a verified token identified the caller (access key or no credential)."""
        return self.credential != "token"

    def context(self) -> tenant_context:
        """The context to serve the request in: ``tenant_context(tenant, anonymous=...)`` as
        :attr:`database_role` says."""
        return tenant_context(self.tenant.id, anonymous=self.database_role == "anonymous")


class Checkpoint:
    """Authenticates requests and refuses those whose identity and target tenant disagree.

    :param verifier: verifies bearer tokens (``None``: the ``Authorization`` header is ignored).
    :param tenant_claim: the token claim that names the bearer's tenant (slug or UUID).
    :param access_key_header: the header carrying a tenant's access key (``None``: not accepted).
    :param require_auth: refuse requests with neither a token nor an access key (401). With False
        they proceed for the tenant they target, anonymously.
    """

    def __init__(
        self,
        *,
        verifier: JWTVerifier | None = None,
        tenant_claim: str = "tenant",
        access_key_header: str | None = "X-Tenant-Access-Key",
        require_auth: bool = True,
    ) -> None:
        if verifier is None and access_key_header is None and require_auth:
            raise CheckpointConfigError(
                "This checkpoint could admit no request: give a verifier, an access_key_header, "
                "or require_auth=False."
            )
        self.verifier = verifier
        self.tenant_claim = tenant_claim
        self.access_key_header = access_key_header
        self.require_auth = require_auth

    def admit(
        self, tenancy: Tenancy, request: RequestView, resolvers: Sequence[TenantResolver] = DEFAULT_RESOLVERS
    ) -> Admission:
        """The admission of ``request``, or the :class:`RequestRejected` to answer it with."""
        token = bearer_token(request) if self.verifier is not None else None
        if token is not None:
            assert self.verifier is not None
            claims = self.verifier.verify(token)
            return self._admit_bearer(tenancy, replace(request, claims=claims), resolvers, claims)
        ref = resolve_reference(request, resolvers)
        target = ref if ref is not None else default_reference(tenancy)
        presented = request.header(self.access_key_header) if self.access_key_header else None
        if presented is not None:
            key = registry_key(tenancy, target)
            candidate = _canonical_uuid(presented)
            # Malformed input is refused without a query: the client learns nothing it did not
            # send, and random strings cannot tie up the admin pool.
            if key is None or candidate is None or not _opens(tenancy, key, candidate):
                raise AuthenticationRequired(f"wrong access key, or no tenant {target!r}")
            try:
                tenant = lookup_tenant(tenancy, target)
            except UnknownTenant:  # deleted in between
                raise AuthenticationRequired(f"no tenant {target!r}") from None
            return Admission(ensure_usable(tenant), "access_key")
        if self.require_auth:
            raise AuthenticationRequired("neither a bearer token nor an access key")
        return Admission(ensure_usable(lookup_tenant(tenancy, target)), "none")

    def _admit_bearer(
        self,
        tenancy: Tenancy,
        request: RequestView,
        resolvers: Sequence[TenantResolver],
        claims: Mapping[str, Any],
    ) -> Admission:
        # The claim is taken as signed: "acme\n" or "ACME" is not acme, it names no tenant.
        claim = claims.get(self.tenant_claim)
        if not isinstance(claim, str) or not claim:
            raise TenantMismatch(f"the token has no {self.tenant_claim!r} claim naming a tenant")
        ref = resolve_reference(request, resolvers)
        target = ref if ref is not None else default_reference(tenancy)
        try:
            own = lookup_tenant(tenancy, claim)
        except UnknownTenant:
            if target == claim:
                raise UnknownTenant(target) from None
            raise TenantMismatch(
                f"the token's tenant {claim!r} does not exist; the request targets {target!r}"
            ) from None
        # Compare by id without looking the target up: a bearer learns nothing about other tenants.
        key = registry_key(tenancy, target)
        if key is None or key not in (own.id, own.slug):
            raise TenantMismatch(f"the token is for tenant {own.slug!r}; the request targets {target!r}")
        return Admission(ensure_usable(own), "token", claims)


def admit(
    tenancy: Tenancy,
    request: RequestView,
    *,
    checkpoint: Checkpoint | None,
    resolvers: Sequence[TenantResolver] = DEFAULT_RESOLVERS,
) -> Admission:
    """Resolve and check one request, framework-neutrally (the integrations call this).

    With ``checkpoint=None`` nothing is authenticated: the request gets the tenant it names (for
    applications that authenticate elsewhere); the admission is then marked anonymous
    (``credential="none"``) but keeps the tenant's full database role, since the application
    vouches for the caller. Raises a :class:`RequestRejected` carrying the status and body to
    answer with.
    """
    if checkpoint is None:
        return Admission(resolve_tenant(tenancy, request, resolvers), "none", database_role="full")
    return checkpoint.admit(tenancy, request, resolvers)
