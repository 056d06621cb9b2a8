"""One tenant per name: a reference from a request names exactly the tenant it spells, or none.

Every generated input (a header, a token claim, a subdomain label, a path segment, an access key)
either maps to the tenant whose canonical slug or canonical id string (``str(tenant.id)``) it is,
or is refused (an error ``http_answer`` answers). Nothing is stripped, case-folded, decoded or
otherwise normalised on the way: ``"acme\\n"``, ``" acme"``, ``"ACME"``, a fullwidth
``"\\uff41cme"``, an upper-case UUID or ``{uuid}`` name no tenant.

The inputs are drawn around the real tenants' references with adversarial mutations (whitespace
and control characters anywhere, case changes, Unicode lookalikes and fullwidth letters,
percent-encoding, trailing dots, ports, repeats, UUID spellings, long strings) and from arbitrary
text, and driven through the real resolvers and the real :meth:`Checkpoint.admit` against a real
registry (built once for the module; look-ups are cached).
"""

from __future__ import annotations

import time
import unicodedata
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import jwt
import psycopg
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import exc, text

from sqla_tenancy import InvalidTenantSlug, Tenancy, TenancyError, Tenant
from sqla_tenancy.checkpoint import Admission, Checkpoint, JWTVerifier, admit, http_answer, issue_access_key
from sqla_tenancy.identifiers import MAX_SLUG_LENGTH, SLUG_PATTERN
from sqla_tenancy.resolvers import (
    ClaimResolver,
    HeaderResolver,
    PathPrefixResolver,
    RequestView,
    SubdomainResolver,
    TenantResolver,
    TenantUnavailable,
    UnknownTenant,
    lookup_tenant,
    registry_key,
)
from sqla_tenancy.testing import TestServer
from tests.models import INFRASTRUCTURE, Base

SECRET = "references-tests-hmac-secret-0123456789abcdef"
BASE_DOMAIN = "example.com"
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(repr=False)
class World:
    """Tenants acme, acme_eu, globex (active), initech (suspended) and the default tenant, each
    with an issued access key."""

    tenancy: Tenancy
    tenants: dict[str, Tenant]
    keys: dict[str, str]

    def __repr__(self) -> str:
        return "World(" + ", ".join(f"{slug}={t.id}" for slug, t in self.tenants.items()) + ")"

    @property
    def references(self) -> list[str]:
        """Every canonical reference: each tenant's slug and the string of its id."""
        return [ref for t in self.tenants.values() for ref in (t.slug, str(t.id))]

    def named(self, ref: str) -> Tenant | None:
        """The tenant ``ref`` spells exactly, or None: the oracle."""
        return next((t for t in self.tenants.values() if ref in (t.slug, str(t.id))), None)


@pytest.fixture(scope="module")
def world(tenancy_server: TestServer) -> Iterator[World]:
    database = tenancy_server.create_database()
    tenancy = Tenancy(
        tenancy_server.url(database),
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        admin_url=tenancy_server.url(database, role="admin"),
        name_prefix=tenancy_server.name_prefix(database),
        registry_ttl=600,
    )
    try:
        tenancy.install()
        tenants = {slug: tenancy.create_tenant(slug) for slug in ("acme", "acme_eu", "globex", "initech")}
        tenants["initech"] = tenancy.suspend_tenant("initech")
        tenants["default"] = tenancy.get_tenant("default")
        keys = {slug: str(issue_access_key(tenancy, slug)) for slug in tenants}
        yield World(tenancy, tenants, keys)
    finally:
        tenancy.dispose()
        tenancy_server.drop_database(database)


# -- adversarial inputs -----------------------------------------------------------------------------

#: Whitespace, line breaks, NUL, C0/C1 controls, zero-width and other invisible characters.
INVISIBLE = [
    " ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x00", "\x1f", "\x7f", "\x85", "\xa0",
    "\u1680", "\u2000", "\u200b", "\u200d", "\u2028", "\u2029", "\u202e", "\u3000", "\ufeff",
]  # fmt: skip
#: Characters that look like (or fold/normalise to) the ASCII ones of slugs and ids.
LOOKALIKES = {
    "a": "\u0430\u0251\uff41\u00e1\u00e0\u00aa\u1d43",
    "b": "\u042c\uff42\u1e03",
    "c": "\u0441\u03f2\uff43\u00e7\u217d",
    "d": "\u0501\uff44\u217e",
    "e": "\u0435\uff45\u00e9\u0117\u212f",
    "f": "\uff46\u017f",
    "g": "\u0261\uff47",
    "h": "\u04bb\uff48",
    "i": "\u0456\u0131\uff49\u0130\u2170",
    "k": "\u212a\uff4b\u03ba",
    "l": "\u217c\uff4c1I",
    "m": "\u043c\uff4d\u217f",
    "n": "\uff4e\u0578",
    "o": "\u043e\u03bf\uff4f0\u00ba",
    "p": "\u0440\uff50",
    "s": "\u0455\uff53\u017f",
    "t": "\uff54\u03c4",
    "u": "\u03c5\uff55\u00fc",
    "x": "\u0445\uff58",
    "_": "\uff3f\u2017-  ",
    "-": "\u2010\u2011\u2013\u2212\ufe63\uff0d",
    "0": "\uff10Oo",
    "1": "\uff11lI",
    "2": "\uff12\u00b2",
    "3": "\uff13\u00b3",
}

Mutation = Callable[[st.DrawFn, str], str]


def _position(draw: st.DrawFn, s: str) -> int:
    return draw(st.integers(0, len(s)))


def _pad(draw: st.DrawFn, s: str) -> str:
    before = draw(st.sampled_from(["", *INVISIBLE]))
    after = draw(st.sampled_from(["", *INVISIBLE]))
    return before + s + after


def _insert_invisible(draw: st.DrawFn, s: str) -> str:
    i = _position(draw, s)
    return s[:i] + draw(st.sampled_from(INVISIBLE)) + s[i:]


def _change_case(draw: st.DrawFn, s: str) -> str:
    how = draw(st.sampled_from(["upper", "title", "swapcase", "one"]))
    if how == "one" and s:
        i = draw(st.integers(0, len(s) - 1))
        return s[:i] + s[i].swapcase() + s[i + 1 :]
    return str(getattr(s, how if how != "one" else "upper")())


def _lookalike(draw: st.DrawFn, s: str) -> str:
    spots = [i for i, c in enumerate(s) if c in LOOKALIKES]
    if not spots:
        return s + draw(st.sampled_from("\u0430\uff45\u0301"))
    i = draw(st.sampled_from(spots))
    return s[:i] + draw(st.sampled_from(LOOKALIKES[s[i]])) + s[i + 1 :]


def _fullwidth(draw: st.DrawFn, s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


def _decompose(draw: st.DrawFn, s: str) -> str:
    # an accent as a combining character, then each normal form of the result
    marked = s + "\u0301" if s else "\u0301"
    return unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD", "NFKC", "NFKD"])), marked)


def _percent_encode(draw: st.DrawFn, s: str) -> str:
    if draw(st.booleans()) or not s:
        return urllib.parse.quote(s, safe="") + draw(st.sampled_from(["", "%0A", "%20", "%00"]))
    i = draw(st.integers(0, len(s) - 1))
    return s[:i] + f"%{ord(s[i]):02X}" + s[i + 1 :]


def _decorate(draw: st.DrawFn, s: str) -> str:
    return draw(st.sampled_from([s + ".", "." + s, s + "..", s + ":443", s + ":", s + "/", s + ";"]))


def _repeat(draw: st.DrawFn, s: str) -> str:
    other = draw(st.sampled_from(["acme", "globex", "", s]))
    return draw(st.sampled_from([f"{s}, {other}", f"{other}, {s}", f"{s},{other}", s * 2]))


def _uuid_spelling(draw: st.DrawFn, s: str) -> str:
    try:
        u = uuid.UUID(s)
    except ValueError:
        return s
    return draw(
        st.sampled_from(
            [
                str(u).upper(),
                str(u)[:8].upper() + str(u)[8:],
                "{" + str(u) + "}",
                "urn:uuid:" + str(u),
                u.hex,
                u.hex.upper(),
                str(u).replace("-", ""),
                str(u)[:-1],
                str(u) + "0",
            ]
        )
    )


def _lengthen(draw: st.DrawFn, s: str) -> str:
    return draw(st.sampled_from([s * 20, s + "x" * 200, s + "_" * (MAX_SLUG_LENGTH + 1)]))


MUTATIONS: list[Mutation] = [
    _pad,
    _insert_invisible,
    _change_case,
    _lookalike,
    _fullwidth,
    _decompose,
    _percent_encode,
    _decorate,
    _repeat,
    _uuid_spelling,
    _lengthen,
]


@st.composite
def variant(draw: st.DrawFn, bases: Sequence[str]) -> str:
    """A base reference with one to three adversarial mutations applied."""
    s = draw(st.sampled_from(bases))
    for _ in range(draw(st.integers(1, 3))):
        s = draw(st.sampled_from(MUTATIONS))(draw, s)
    return s


def references(world: World) -> st.SearchStrategy[str]:
    """Canonical references, their adversarial variants, well-formed unknown slugs, and noise."""
    return st.one_of(
        st.sampled_from(world.references),
        variant(world.references),
        variant(world.references),
        st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
        st.text(max_size=60),
    )


# -- helpers ----------------------------------------------------------------------------------------


def token(claim: str) -> str:
    return jwt.encode({"tenant": claim, "sub": "user-1", "exp": int(time.time()) + 600}, SECRET, "HS256")


def outcome(run: Callable[[], Admission]) -> Admission | TenancyError:
    """The admission, or the refusal (an error the integrations answer, see http_answer)."""
    try:
        admission = run()
    except TenancyError as refused:
        if http_answer(refused) is None:
            raise
        event(f"refused: {type(refused).__name__}")
        return refused
    event("admitted")
    return admission


def assert_maps_exactly(world: World, ref: str, result: Admission | TenancyError) -> None:
    """``result`` is the admission of the tenant ``ref`` spells, or a refusal when it spells none
    (a suspended tenant is refused as itself)."""
    expected = world.named(ref)
    if expected is None:
        assert isinstance(result, TenancyError), (ref, result)
        assert not isinstance(result, TenantUnavailable), (ref, result)
    elif expected.status == "suspended":
        assert isinstance(result, TenantUnavailable) and result.slug == expected.slug, (ref, result)
    else:
        assert isinstance(result, Admission), (ref, result)
        assert result.tenant.id == expected.id, (ref, result.tenant)


def resolve(world: World, view: RequestView, resolvers: Sequence[TenantResolver]) -> Admission:
    return admit(world.tenancy, view, checkpoint=None, resolvers=resolvers)


# -- properties -------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data())
def test_a_reference_names_exactly_the_tenant_it_spells(world: World, data: st.DataObject) -> None:
    ref = data.draw(references(world))
    key = registry_key(world.tenancy, ref)
    expected = world.named(ref)
    if expected is None:
        assert key is None or world.named(str(key)) is None, (ref, key)
        with pytest.raises(UnknownTenant):
            lookup_tenant(world.tenancy, ref)
    else:
        assert key in (expected.slug, expected.id), (ref, key)
        assert lookup_tenant(world.tenancy, ref).id == expected.id


@PROPERTY
@given(data=st.data())
def test_a_header_names_exactly_the_tenant_it_spells(world: World, data: st.DataObject) -> None:
    values = data.draw(st.lists(references(world), min_size=1, max_size=3))
    view = RequestView.from_pairs("GET", "/projects", "api.example.com", [("X-Tenant-ID", v) for v in values])
    result = outcome(lambda: resolve(world, view, [HeaderResolver()]))
    if len(values) > 1:  # repeated headers, joined with ", ", name no tenant
        assert isinstance(result, UnknownTenant), (values, result)
    else:
        assert_maps_exactly(world, values[0], result)


@PROPERTY
@given(data=st.data())
def test_a_subdomain_names_exactly_the_tenant_it_spells(world: World, data: st.DataObject) -> None:
    label = data.draw(references(world))
    base = data.draw(st.sampled_from([BASE_DOMAIN, BASE_DOMAIN.upper(), "Example.Com"]))
    host = label + "." + base + data.draw(st.sampled_from(["", ".", ":8443", ".:443", ":"]))
    result = outcome(lambda: resolve(world, RequestView("GET", "/", host), [SubdomainResolver(BASE_DOMAIN)]))
    if label == "www":  # ignored: the request names no tenant
        assert isinstance(result, Admission) and result.tenant.is_default
    else:
        assert_maps_exactly(world, label, result)


@PROPERTY
@given(data=st.data())
def test_a_path_segment_names_exactly_the_tenant_it_spells(world: World, data: st.DataObject) -> None:
    segment = data.draw(references(world))
    view = RequestView("GET", f"/t/{segment}/projects", "api.example.com")
    result = outcome(lambda: resolve(world, view, [PathPrefixResolver("/t/")]))
    assert_maps_exactly(world, segment.split("/", 1)[0], result)


@PROPERTY
@given(data=st.data())
def test_a_signed_claim_admits_exactly_the_tenant_it_spells(world: World, data: st.DataObject) -> None:
    """A correctly signed token whose tenant claim is the generated string, aimed at a target
    named by header, subdomain, path or (no target) the claim itself."""
    claim = data.draw(references(world))
    how = data.draw(st.sampled_from(["claim", "header", "subdomain", "path"]))
    target = data.draw(st.one_of(st.just(claim), st.sampled_from(world.references)))
    auth = [("Authorization", f"Bearer {token(claim)}")]
    resolvers: list[TenantResolver] = [ClaimResolver()]
    host, path = "api.example.com", "/projects"
    if how == "claim":
        target = claim
    elif how == "header":
        auth.append(("X-Tenant-ID", target))
        resolvers.insert(0, HeaderResolver())
    elif how == "subdomain":
        assume(target != "www")
        host = f"{target}.{BASE_DOMAIN}"
        resolvers.insert(0, SubdomainResolver(BASE_DOMAIN))
    else:
        assume("/" not in target)
        path = f"/t/{target}/projects"
        resolvers.insert(0, PathPrefixResolver("/t/"))
    view = RequestView.from_pairs("GET", path, host, auth)
    checkpoint = Checkpoint(verifier=JWTVerifier(SECRET, algorithms=["HS256"]))
    result = outcome(lambda: checkpoint.admit(world.tenancy, view, resolvers))
    own, aimed = world.named(claim), world.named(target)
    if own is not None and aimed is not None and own.id == aimed.id:
        assert_maps_exactly(world, claim, result)
        if isinstance(result, Admission):
            assert result.credential == "token"
    else:
        assert isinstance(result, TenancyError), (claim, how, target, result)


@PROPERTY
@given(data=st.data())
def test_only_the_exact_access_key_admits_and_only_its_tenant(world: World, data: st.DataObject) -> None:
    owner = data.draw(st.sampled_from(sorted(world.keys)))
    real = world.keys[owner]
    own_refs = [owner, str(world.tenants[owner].id)]
    presented = data.draw(st.one_of(st.just(real), variant([real]), st.text(max_size=40)))
    target = data.draw(st.one_of(st.sampled_from(own_refs), references(world)))
    view = RequestView.from_pairs(
        "GET", "/projects", "api.example.com", [("X-Tenant-ID", target), ("X-Tenant-Access-Key", presented)]
    )
    result = outcome(lambda: Checkpoint().admit(world.tenancy, view))
    aimed = world.named(target)
    if presented == real and aimed is not None and aimed.slug == owner:
        assert_maps_exactly(world, target, result)
        if isinstance(result, Admission):
            assert (result.credential, result.database_role) == ("access_key", "anonymous")
    else:
        assert isinstance(result, TenancyError), (owner, presented, target, result)


def _canonical_slug(s: str) -> bool:
    return SLUG_PATTERN.fullmatch(s) is not None and len(s) <= MAX_SLUG_LENGTH


@PROPERTY
@given(data=st.data())
def test_no_tenant_can_be_created_under_a_non_canonical_slug(world: World, data: st.DataObject) -> None:
    slug = data.draw(st.one_of(variant(["acme", "acme_eu", "globex", "new_tenant"]), st.text(max_size=50)))
    assume(not _canonical_slug(slug))
    with pytest.raises(InvalidTenantSlug):
        world.tenancy.create_tenant(slug)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_raw_sql_cannot_register_a_non_canonical_slug(world: World, data: st.DataObject) -> None:
    slug = data.draw(st.one_of(variant(["acme", "acme_eu", "globex", "new_tenant"]), st.text(max_size=50)))
    assume(not _canonical_slug(slug) and "\x00" not in slug)  # PostgreSQL text holds no NUL at all
    with pytest.raises(exc.IntegrityError) as refused, world.tenancy.admin_engine.begin() as conn:
        conn.execute(
            text("insert into tenancy.tenants (slug, name, strategy) values (:s, 'x', 'shared')"), {"s": slug}
        )
    assert isinstance(refused.value.orig, psycopg.errors.CheckViolation)
    assert "tenants_slug_check" in str(refused.value.orig)
