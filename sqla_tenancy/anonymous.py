"""The low-privilege database role of anonymous requests (a tenant's access key, or no credential).

Inside ``tenant_context(tenant, anonymous=True)`` a transaction is bound to the tenant as usual,
then switched with ``SET LOCAL ROLE`` to a role that may only ``SELECT`` from the tables the
application opted in with :func:`~sqla_tenancy.models.anonymous_readable`. The tenant's RLS
policies still apply to it; an opt-in with a row filter adds a ``RESTRICTIVE`` policy
``tenancy_anonymous`` for that role, so both must hold. Every other table, and every write, is
refused by PostgreSQL with ``permission denied``.

The roles (``<prefix>`` is the Tenancy's ``name_prefix``; all are NOLOGIN, NOSUPERUSER,
NOBYPASSRLS):

* ``<prefix>_anonymous``: the shared placement's anonymous role, reading the opted-in tenant
  tables of the main database (created by :meth:`Tenancy.install`);
* ``<prefix>_<slug>_anon``: a schema or database tenant's anonymous role, reading the opted-in
  tables of that tenant's schema or database only (created with the tenant, dropped with it);
* ``<prefix>_anonymous_infra``: the group every anonymous role of the main database belongs to
  (the shared one and the schema tenants'): ``USAGE`` on the ``tenancy`` and infrastructure
  schemas, ``SELECT`` on the opted-in infrastructure tables, which keeps their grants and policies
  to one role however large the fleet. Database tenants' anonymous roles reach no
  infrastructure table (their foreign tables are not granted to them);
* ``<prefix>_anonymous_gate``: a NOINHERIT role the application role belongs to, itself a member
  of every anonymous role of the main cluster. Membership through it lets the application role
  ``SET ROLE`` to an anonymous role; NOINHERIT stops the anonymous roles' privileges, and the
  anonymous policies, from reaching the application role itself, on every PostgreSQL version.
  (A database tenant's login role is NOINHERIT already and is granted its anonymous role directly.)

Like the schema placement's role, this is a defence for the application's own queries: SQL that
runs inside the transaction as the application's session user can ``RESET ROLE``, so it does not
contain SQL injection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Table, text

from .errors import ProvisioningError, UnsupportedOperation
from .identifiers import quote_ident, quote_literal, role_name
from .registry import REGISTRY_SCHEMA
from .rls import ANONYMOUS_INFO_KEY, is_tenant_scoped, qualified_name

if TYPE_CHECKING:
    from .config import TenancyConfig

__all__ = [
    "ANONYMOUS_INFO_KEY",
    "ANONYMOUS_POLICY",
    "anonymous_filter",
    "anonymous_gate",
    "anonymous_group",
    "anonymous_role",
    "create_tenant_anonymous_role",
    "existing_role_error",
    "grant_database_tenant",
    "is_anonymous_readable",
    "main_database_ddl",
    "refuse_anonymous_without_login",
    "refuse_existing_role",
    "role_exists",
    "schema_tenant_ddl",
    "table_access_ddl",
    "tenant_anonymous_role",
]

#: The RESTRICTIVE policy carrying an opted-in table's row filter.
ANONYMOUS_POLICY = "tenancy_anonymous"

_ROLE_OPTIONS = "NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"


def is_anonymous_readable(table: Table) -> bool:
    """Whether anonymous requests may read ``table`` (see :func:`~sqla_tenancy.models.anonymous_readable`)."""
    value = table.info.get(ANONYMOUS_INFO_KEY)
    return value is True or isinstance(value, str)


def anonymous_filter(table: Table) -> str | None:
    """The row filter an opted-in table applies to anonymous reads (``None``: no filter)."""
    value = table.info.get(ANONYMOUS_INFO_KEY)
    return value if isinstance(value, str) else None


def anonymous_role(config: TenancyConfig) -> str:
    """The shared placement's anonymous role."""
    return f"{config.name_prefix}_anonymous"


def anonymous_group(config: TenancyConfig) -> str:
    """The group of the main database's anonymous roles (their infrastructure access)."""
    return f"{config.name_prefix}_anonymous_infra"


def anonymous_gate(config: TenancyConfig) -> str:
    """The NOINHERIT role through which the application role may switch to anonymous roles."""
    return f"{config.name_prefix}_anonymous_gate"


def refuse_anonymous_without_login(config: TenancyConfig) -> None:
    """On Citus the anonymous roles log in to the workers (the coordinator connects as the
    current role) with passwords derived from the secret key: without one, refuse."""
    if config.distributed and not config.has_secret():
        raise UnsupportedOperation(
            "Anonymous (access-key) requests on Citus (distributed=True) need a secret_key: Citus "
            "reaches the workers as the current role, so the anonymous roles log in there with "
            "passwords derived from it. Pass Tenancy(secret_key=...), run tenancy.install() (or the "
            "migrations) again, and let the roles of tenancy.node_logins() in between the nodes."
        )


def tenant_anonymous_role(config: TenancyConfig, slug: str) -> str:
    """A schema or database tenant's anonymous role (``<prefix>_<slug>_anon``)."""
    return role_name(slug, "anon", config.name_prefix)


def table_access_ddl(
    tables: Iterable[Table], role: str, *, schema: str | None = None, fresh: bool = False
) -> list[str]:
    """What ``role`` may read of ``tables``: ``SELECT`` on the opted-in ones, with their row
    filters as RESTRICTIVE policies ``TO role``.

    ``schema`` places unqualified tables there (a schema tenant's schema, a tenant database's
    ``public``). Unless ``fresh`` (tables just created, so nothing to take back), the statements
    are idempotent and also revoke what ``role`` holds on tables no longer opted in.
    """
    r = quote_ident(role)
    statements: list[str] = []
    for table in tables:
        if schema is not None and table.schema is None:
            target = f"{quote_ident(schema)}.{quote_ident(table.name)}"
        else:
            target = qualified_name(table)
        if not fresh:
            statements += [
                f"DROP POLICY IF EXISTS {ANONYMOUS_POLICY} ON {target}",
                f"REVOKE ALL ON {target} FROM {r}",
            ]
        if not is_anonymous_readable(table):
            continue
        statements.append(f"GRANT SELECT ON {target} TO {r}")
        where = anonymous_filter(table)
        if where is None:
            continue
        if not is_tenant_scoped(table):
            raise ProvisioningError(
                f"Table {table.fullname!r} is opted in to anonymous reads with the row filter "
                f"{where!r}, but it has no tenant_id and so no row-level security to apply the "
                "filter with. Opt it in without a filter (anonymous_readable()), or make it "
                "TenantScoped."
            )
        statements.append(
            f"CREATE POLICY {ANONYMOUS_POLICY} ON {target} AS RESTRICTIVE FOR SELECT TO {r} USING ({where})"
        )
    return statements


def _create_role_if_missing(role: str, options: str) -> str:
    return (
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {quote_literal(role)}) "
        f"THEN CREATE ROLE {quote_ident(role)} {options}; END IF; END $$"
    )


def main_database_ddl(config: TenancyConfig, tables: Iterable[Table], app_role: str | None) -> list[str]:
    """Idempotent: the main database's anonymous roles, what they may read of ``tables`` (tables
    that exist there: tenant tables for the shared role, infrastructure tables for the group), and
    the application role's way to them. Run by :meth:`Tenancy.install` with the tables' grants."""
    tables = list(tables)
    role, group, gate = anonymous_role(config), anonymous_group(config), anonymous_gate(config)
    r, g = quote_ident(role), quote_ident(group)
    statements = [
        _create_role_if_missing(group, f"{_ROLE_OPTIONS} NOINHERIT"),
        _create_role_if_missing(role, f"{_ROLE_OPTIONS} INHERIT"),
        _create_role_if_missing(gate, f"{_ROLE_OPTIONS} NOINHERIT"),
        f"GRANT {g} TO {r}",
        f"GRANT {r} TO {quote_ident(gate)}",
        f"GRANT USAGE ON SCHEMA {REGISTRY_SCHEMA} TO {g}",
        f"GRANT EXECUTE ON FUNCTION {REGISTRY_SCHEMA}.current_tenant_id() TO {g}",
    ]
    infrastructure = [t for t in tables if t.schema in config.infrastructure_schemas]
    tenant_tables = [t for t in tables if t.schema not in config.infrastructure_schemas]
    for schema in sorted({t.schema for t in infrastructure if t.schema}):
        statements.append(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {g}")
    for schema in sorted({t.schema or "public" for t in tenant_tables}):
        statements.append(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {r}")
    statements += table_access_ddl(tenant_tables, role)
    statements += table_access_ddl(infrastructure, group)
    if app_role:
        statements.append(f"GRANT {quote_ident(gate)} TO {quote_ident(app_role)}")
    return statements


def schema_tenant_ddl(
    config: TenancyConfig, schema: str, role: str, *, fresh: bool = True, group: bool = True
) -> list[str]:
    """A schema tenant's anonymous role: its schema, its opted-in tables, the infrastructure group
    unless ``group`` is False (the role itself is created with the schema, and on PostgreSQL 16+
    as a member of the group already; the gate's membership comes last)."""
    r = quote_ident(role)
    return [
        f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {r}",
        *([f"GRANT {quote_ident(anonymous_group(config))} TO {r}"] if group else []),
        *table_access_ddl(config.tenant_tables(), role, schema=schema, fresh=fresh),
    ]


def grant_database_tenant(conn: Connection, config: TenancyConfig, role: str, *, fresh: bool = True) -> None:
    """Inside a tenant database (``conn``, as the tables' owner): what its anonymous role may read
    of the tenant tables there (no foreign table: the infrastructure stays out of its reach)."""
    present = set(conn.execute(text("select tablename from pg_tables where schemaname = 'public'")).scalars())
    tables = [t for t in config.tenant_tables() if t.schema is None and t.name in present]
    r = quote_ident(role)
    statements = [
        f"GRANT USAGE ON SCHEMA public TO {r}",
        f"GRANT USAGE ON SCHEMA {REGISTRY_SCHEMA} TO {r}",
        *table_access_ddl(tables, role, schema="public", fresh=fresh),
    ]
    for statement in statements:
        conn.exec_driver_sql(statement)


def role_exists(conn: Connection, role: str) -> bool:
    """Whether ``role`` exists on ``conn``'s server (roles are cluster-wide)."""
    return conn.execute(text("select 1 from pg_roles where rolname = :r"), {"r": role}).first() is not None


def existing_role_error(role: str) -> ProvisioningError:
    """What provisioning raises when a role it would create exists already."""
    return ProvisioningError(
        f"Role {role!r} exists already, and provisioning did not create it (roles are "
        "cluster-wide: is another application on this cluster using the same name_prefix?). "
        "sqla-tenancy neither adopts nor drops it: give Tenancy a distinct name_prefix, or drop it."
    )


def refuse_existing_role(conn: Connection, role: str) -> None:
    """:class:`ProvisioningError` when ``role`` exists: provisioning creates its roles, it neither
    adopts nor (on failure) drops one it did not make."""
    if role_exists(conn, role):
        raise existing_role_error(role)


def create_tenant_anonymous_role(conn: Connection, role: str, *, member: str) -> None:
    """Create a database tenant's anonymous role and let ``member`` (its NOINHERIT login role)
    switch to it."""
    refuse_existing_role(conn, role)
    conn.exec_driver_sql(f"CREATE ROLE {quote_ident(role)} {_ROLE_OPTIONS} NOINHERIT")
    conn.exec_driver_sql(f"GRANT {quote_ident(role)} TO {quote_ident(member)}")
