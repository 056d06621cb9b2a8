"""Validation and quoting of tenant slugs and of the PostgreSQL identifiers derived from them.

Every identifier sqla-tenancy builds from user input passes :func:`validate_slug` first and is
quoted with :func:`quote_ident` always. Derived names keep within PostgreSQL's 63-byte limit.
"""

from __future__ import annotations

import re

from .errors import InvalidTenantSlug

__all__ = [
    "MAX_SLUG_LENGTH",
    "RESERVED_PREFIXES",
    "RESERVED_SLUGS",
    "SLUG_PATTERN",
    "database_name",
    "quote_ident",
    "quote_literal",
    "role_name",
    "schema_name",
    "validate_prefix",
    "validate_slug",
]

#: Slug prefixes nobody may take: ``pg_`` (PostgreSQL's) and ``fdw_`` (the main database tells a
#: database tenant's FDW login role, ``<prefix>_fdw_<tenant id>``, by that prefix).
RESERVED_PREFIXES = ("pg_", "fdw_")

#: PostgreSQL truncates identifiers longer than this many bytes.
MAX_IDENTIFIER_BYTES = 63
#: Longest ``name_prefix``: derived names are ``<prefix>_<slug>[_<purpose>]``.
MAX_PREFIX_LENGTH = 16
PREFIX_PATTERN = re.compile(rf"[a-z][a-z0-9_]{{0,{MAX_PREFIX_LENGTH - 1}}}")
#: The longest decoration added to a slug (``<prefix>_`` + slug + ``_owner``).
_LONGEST_DECORATION = MAX_PREFIX_LENGTH + 1 + len("_owner")
#: Longest slug, chosen so that every derived identifier fits in 63 bytes.
MAX_SLUG_LENGTH = 40

#: What a slug is made of. Always matched whole (``fullmatch``): ``re.match`` with ``$`` would
#: accept a trailing newline, and ``"acme\n"`` would be a second tenant beside ``acme``.
SLUG_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

#: Slugs nobody may take. ``default`` is reserved for the default tenant itself; ``template``,
#: ``tenants`` and the ``anonymous`` family would derive names (``<prefix>_template``,
#: ``<prefix>_tenants``, ...) that the library's own template database and group roles carry.
RESERVED_SLUGS = frozenset(
    {
        "template",
        "tenants",
        "anonymous",
        "anonymous_infra",
        "anonymous_gate",
        "default",
        "postgres",
        "template0",
        "template1",
        "public",
        "information_schema",
        "tenancy",
        "admin",
        "platform",
        "root",
        "all",
        "none",
        "null",
        "current_user",
        "session_user",
        "user",
    }
)

assert MAX_SLUG_LENGTH + _LONGEST_DECORATION <= MAX_IDENTIFIER_BYTES


def validate_slug(slug: object, *, allow_default: str | None = None) -> str:
    """Return ``slug`` if it is a valid tenant slug, else raise :class:`InvalidTenantSlug`.

    Rules: lower-case ASCII letters, digits and ``_``; starts with a letter; at most
    :data:`MAX_SLUG_LENGTH` characters; not in :data:`RESERVED_SLUGS` and not starting with
    ``pg_`` or ``fdw_`` (:data:`RESERVED_PREFIXES`). Nothing is stripped or folded: a slug is
    taken exactly as given or refused. ``allow_default`` names the configured default
    tenant, which is the one reserved slug that passes.
    """
    if not isinstance(slug, str):
        raise InvalidTenantSlug(f"A tenant slug must be a str, not {type(slug).__name__}.")
    if slug == allow_default:
        return slug
    if not slug:
        raise InvalidTenantSlug("A tenant slug cannot be empty.")
    if len(slug) > MAX_SLUG_LENGTH:
        raise InvalidTenantSlug(
            f"Tenant slug {slug[:50]!r} is {len(slug)} characters long; the limit is "
            f"{MAX_SLUG_LENGTH} so that derived database, schema and role names fit PostgreSQL's "
            f"{MAX_IDENTIFIER_BYTES}-byte identifiers."
        )
    if SLUG_PATTERN.fullmatch(slug) is None:
        raise InvalidTenantSlug(
            f"Tenant slug {slug!r} is not valid: use lower-case letters, digits and '_', "
            "starting with a letter (for example 'acme' or 'acme_eu')."
        )
    if slug in RESERVED_SLUGS or slug.startswith(RESERVED_PREFIXES):
        raise InvalidTenantSlug(f"Tenant slug {slug!r} is reserved; choose another one.")
    return slug


def validate_prefix(prefix: str) -> str:
    """Check a ``name_prefix`` (see :class:`Tenancy`): short, lower-case, starts with a letter."""
    if not isinstance(prefix, str) or PREFIX_PATTERN.fullmatch(prefix) is None:
        raise InvalidTenantSlug(
            f"name_prefix {prefix!r} is not valid: 1 to {MAX_PREFIX_LENGTH} lower-case letters, "
            "digits or '_', starting with a letter."
        )
    return prefix


def schema_name(slug: str, prefix: str = "tenant") -> str:
    """The schema a schema-placement tenant lives in (``tenant_acme``)."""
    return f"{validate_prefix(prefix)}_{validate_slug(slug)}"


def database_name(slug: str, prefix: str = "tenant") -> str:
    """The database a database-placement tenant lives in (``tenant_acme``)."""
    return f"{validate_prefix(prefix)}_{validate_slug(slug)}"


def role_name(slug: str, purpose: str, prefix: str = "tenant") -> str:
    """A per-tenant role name, e.g. ``tenant_acme_app`` or ``tenant_acme_anon`` (the role of the
    tenant's anonymous requests).

    Roles and databases are cluster-wide: applications sharing a cluster need distinct prefixes.
    """
    if purpose not in {"app", "anon", "fdw", "owner"}:
        raise ValueError(f"unknown role purpose {purpose!r}")
    return f"{validate_prefix(prefix)}_{validate_slug(slug)}_{purpose}"


def quote_ident(name: str) -> str:
    """Quote an identifier for PostgreSQL, always (never rely on it being 'safe')."""
    if "\x00" in name:
        raise ValueError("identifiers cannot contain NUL")
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValueError(f"identifier {name[:20]!r}... is longer than {MAX_IDENTIFIER_BYTES} bytes")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string literal for PostgreSQL (standard_conforming_strings is on since 9.1)."""
    if "\x00" in value:
        raise ValueError("literals cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"
