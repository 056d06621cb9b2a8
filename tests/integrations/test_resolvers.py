"""Resolvers read a tenant reference from a request; no database involved."""

from __future__ import annotations

import pytest

from sqla_tenancy.resolvers import (
    ClaimResolver,
    HeaderResolver,
    PathPrefixResolver,
    RequestView,
    SubdomainResolver,
    UnknownTenant,
    resolve_reference,
)


def test_header_resolver_reads_the_header_name_case_insensitively() -> None:
    request = RequestView.from_pairs("GET", "/", "h", [("x-TENANT-id", "acme")])
    assert HeaderResolver()(request) == "acme"
    assert HeaderResolver("X-Org")(request) is None


@pytest.mark.parametrize("value", [" acme ", "acme\n", "ACME", "", "  "])
def test_header_values_are_taken_exactly_as_sent(value: str) -> None:
    """Nothing is stripped or folded, and an empty header is a reference (to no tenant), not a
    request that names none (which would get the default tenant)."""
    assert HeaderResolver()(RequestView.from_pairs("GET", "/", "h", [("X-Tenant-ID", value)])) == value


def test_repeated_headers_are_joined_so_they_name_no_tenant() -> None:
    request = RequestView.from_pairs("GET", "/", "h", [("X-Tenant-ID", "acme"), ("X-Tenant-ID", "globex")])
    assert HeaderResolver()(request) == "acme, globex"


def test_host_defaults_to_the_host_header() -> None:
    request = RequestView.from_pairs("get", "/", None, [("Host", "acme.example.com:8443")])
    assert (request.method, request.host) == ("GET", "acme.example.com:8443")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("acme.example.com", "acme"),
        ("acme.Example.COM:8443", "acme"),  # the base domain in any case, the port set aside
        ("acme.example.com:", "acme"),
        ("acme.example.com.", "acme"),  # the DNS root
        ("acme.example.com.:443", "acme"),
        ("ACME.example.com", "ACME"),  # the label as sent: names no tenant, never folded to acme
        ("acme\n.example.com", "acme\n"),
        (" acme.example.com", " acme"),
        (".example.com", ""),  # an empty label: refused, not the default tenant
        ("acme:1.example.com", "acme:1"),
        ("example.com", None),
        ("www.example.com", None),
        ("WWW.example.com", "WWW"),
        ("acme.example.org", None),
        ("acme.notexample.com", None),
        ("acme.example.co\u212a", None),  # a Kelvin sign lower-cases to k: not the base domain
        ("acme.example.com..", None),
        ("a.b.example.com", "a.b"),  # malformed: resolves to no tenant rather than the default
        ("[::1]:8000", None),
        ("[::1]", None),
        ("[acme.example.com", "[acme"),
    ],
)
def test_subdomain_resolver(host: str, expected: str | None) -> None:
    assert SubdomainResolver("example.com")(RequestView("GET", "/", host)) == expected


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        ("/t/", "/t/acme/projects", "acme"),
        ("/t/", "/t/acme", "acme"),
        ("t", "/t/acme/", "acme"),
        ("/t/", "/t//projects", ""),  # an empty segment: refused, not the default tenant
        ("/t/", "/t/ acme/projects", " acme"),
        ("/t/", "/t/ACME", "ACME"),
        ("/t/", "/tenants/acme", None),
        ("/tenants", "/tenants/globex/x", "globex"),
        ("/t/", "/projects", None),
    ],
)
def test_path_prefix_resolver(prefix: str, path: str, expected: str | None) -> None:
    assert PathPrefixResolver(prefix)(RequestView("GET", path, "h")) == expected


def test_claim_resolver_reads_only_verified_claims() -> None:
    assert ClaimResolver()(RequestView("GET", "/", "h")) is None
    assert ClaimResolver()(RequestView("GET", "/", "h", claims={"tenant": "acme"})) == "acme"
    assert ClaimResolver("org")(RequestView("GET", "/", "h", claims={"org": "globex"})) == "globex"
    assert ClaimResolver()(RequestView("GET", "/", "h", claims={"sub": "x"})) is None
    assert ClaimResolver()(RequestView("GET", "/", "h", claims={"tenant": "acme\n"})) == "acme\n"


@pytest.mark.parametrize("value", [42, None, ["acme"], {"slug": "acme"}, True, float("inf")])
def test_a_claim_that_is_not_a_string_names_no_tenant(value: object) -> None:
    with pytest.raises(UnknownTenant):
        ClaimResolver()(RequestView("GET", "/", "h", claims={"tenant": value}))


def test_the_first_resolver_that_yields_wins() -> None:
    resolvers = [HeaderResolver(), SubdomainResolver("example.com"), ClaimResolver()]
    both = RequestView("GET", "/", "globex.example.com", {"x-tenant-id": "acme"}, claims={"tenant": "x"})
    assert resolve_reference(both, resolvers) == "acme"
    host_only = RequestView("GET", "/", "globex.example.com", claims={"tenant": "x"})
    assert resolve_reference(host_only, resolvers) == "globex"
    claim_only = RequestView("GET", "/", "example.com", claims={"tenant": "x"})
    assert resolve_reference(claim_only, resolvers) == "x"
    assert resolve_reference(RequestView("GET", "/", "example.com"), resolvers) is None
