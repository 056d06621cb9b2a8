"""Slugs and the identifiers derived from them."""

from __future__ import annotations

import logging

import psycopg
import pytest
from sqlalchemy import exc, text

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


#: Spellings of a valid slug that must never be a second tenant beside it (nor be folded into it).
NON_CANONICAL = [
    "acme\n",
    "acme\r\n",
    " acme",
    "acme ",
    "acme\t",
    "ac me",
    "acme\x00",
    "acme\u200b",
    "\ufeffacme",
    "ACME",
    "Acme",
    "\uff41cme",  # fullwidth a
    "\u0430cme",  # Cyrillic a
    "acme\u0301",  # a combining accent
    "acm\u00e9",
    "acme.",
    "acme-eu",
    "%61cme",
    "a" * 41,
]


@pytest.mark.parametrize("slug", NON_CANONICAL)
def test_non_canonical_spellings_of_a_slug_are_refused(slug: str) -> None:
    with pytest.raises(InvalidTenantSlug):
        validate_slug(slug)


@pytest.mark.parametrize(
    "slug", ["Bad", "pg_x", "default", "a" * 41, "robert'); drop table x;--", "acme\n", " acme", "\uff41cme"]
)
def test_create_tenant_with_bad_slug_creates_nothing(tenancy: Tenancy, slug: str) -> None:
    before = tenancy.list_tenants()
    with pytest.raises(InvalidTenantSlug):
        tenancy.create_tenant(slug)
    assert tenancy.list_tenants() == before
    with tenancy.admin_engine.connect() as conn:
        assert conn.execute(text("select count(*) from tenancy.tenants")).scalar() == len(before)


def insert_slug(tenancy: Tenancy, slug: str) -> None:
    with tenancy.admin_engine.begin() as conn:
        conn.execute(
            text("insert into tenancy.tenants (slug, name, strategy) values (:s, :s, 'shared')"), {"s": slug}
        )


@pytest.mark.parametrize("slug", [s for s in NON_CANONICAL if "\x00" not in s])
def test_raw_sql_cannot_register_a_non_canonical_slug(tenancy: Tenancy, slug: str) -> None:
    """The registry's CHECK constraint holds slugs to the pattern and length, matched whole."""
    with pytest.raises(exc.IntegrityError) as refused:
        insert_slug(tenancy, slug)
    assert isinstance(refused.value.orig, psycopg.errors.CheckViolation)
    assert "tenants_slug_check" in str(refused.value.orig)
    insert_slug(tenancy, "acme")  # the canonical one is fine


def slug_check(tenancy: Tenancy) -> bool | None:
    """Whether the slug CHECK constraint is validated (None: there is none)."""
    with tenancy.admin_engine.connect() as conn:
        validated = conn.execute(
            text(
                "select convalidated from pg_constraint where conname = 'tenants_slug_check' "
                "and conrelid = 'tenancy.tenants'::regclass"
            )
        ).scalar()
    assert validated is None or isinstance(validated, bool)
    return validated


def test_an_earlier_registry_gets_the_slug_check(tenancy: Tenancy, caplog: pytest.LogCaptureFixture) -> None:
    """A registry made before the constraint, holding a slug registered before slugs were matched
    whole, gets the constraint NOT VALID and a warning naming that row; new rows obey it at once,
    and the constraint is validated once the row is gone."""
    with tenancy.admin_engine.begin() as conn:
        conn.exec_driver_sql("alter table tenancy.tenants drop constraint tenants_slug_check")
    insert_slug(tenancy, "acme\n")
    with caplog.at_level(logging.WARNING, logger="sqla_tenancy.installer"):
        tenancy.install()
    assert slug_check(tenancy) is False
    assert "'acme\\n'" in caplog.text and "tenants_slug_check" in caplog.text
    with pytest.raises(exc.IntegrityError):
        insert_slug(tenancy, "globex ")
    caplog.clear()
    tenancy.install()  # idempotent: still not valid, still said
    assert slug_check(tenancy) is False and "'acme\\n'" in caplog.text
    with tenancy.admin_engine.begin() as conn:
        conn.execute(text("delete from tenancy.tenants where slug = :s"), {"s": "acme\n"})
    caplog.clear()
    tenancy.install()
    assert slug_check(tenancy) is True
    assert "not canonical" not in caplog.text


def test_an_earlier_registry_without_bad_rows_gets_a_valid_slug_check(tenancy: Tenancy) -> None:
    with tenancy.admin_engine.begin() as conn:
        conn.exec_driver_sql("alter table tenancy.tenants drop constraint tenants_slug_check")
    tenancy.create_tenant("acme")
    tenancy.install()
    assert slug_check(tenancy) is True
