"""Slugs and the identifiers derived from them."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from sqla_tenancy import InvalidTenantSlug, Tenancy
from sqla_tenancy.identifiers import (
    MAX_SLUG_LENGTH,
    database_name,
    quote_ident,
    role_name,
    schema_name,
    validate_slug,
)


@pytest.mark.parametrize("slug", ["acme", "a", "acme_eu", "x1", "a" * MAX_SLUG_LENGTH])
def test_valid_slugs(slug: str) -> None:
    assert validate_slug(slug) == slug
    for derived in (schema_name(slug), database_name(slug), role_name(slug, "owner")):
        assert len(derived.encode()) <= 63


@pytest.mark.parametrize(
    "slug",
    [
        "",
        "Acme",
        "1acme",
        "_acme",
        "acme-eu",
        "acme eu",
        "acme;drop",
        'ac"me',
        "ä",
        "a" * (MAX_SLUG_LENGTH + 1),
        "default",
        "postgres",
        "template0",
        "template1",
        "public",
        "information_schema",
        "tenancy",
        "pg_catalog",
        "pg_anything",
    ],
)
def test_invalid_or_reserved_slugs(slug: str) -> None:
    with pytest.raises(InvalidTenantSlug):
        validate_slug(slug)


def test_non_string_slug() -> None:
    with pytest.raises(InvalidTenantSlug, match="must be a str"):
        validate_slug(7)


def test_default_is_allowed_only_as_the_default() -> None:
    assert validate_slug("default", allow_default="default") == "default"


def test_quote_ident_always_quotes() -> None:
    assert quote_ident("acme") == '"acme"'
    assert quote_ident('we"ird') == '"we""ird"'
    with pytest.raises(ValueError):
        quote_ident("x" * 64)


@pytest.mark.parametrize("slug", ["Bad", "pg_x", "default", "a" * 41, "robert'); drop table x;--"])
def test_create_tenant_with_bad_slug_creates_nothing(tenancy: Tenancy, slug: str) -> None:
    before = tenancy.list_tenants()
    with pytest.raises(InvalidTenantSlug):
        tenancy.create_tenant(slug)
    assert tenancy.list_tenants() == before
    with tenancy.admin_engine.connect() as conn:
        assert conn.execute(text("select count(*) from tenancy.tenants")).scalar() == len(before)
