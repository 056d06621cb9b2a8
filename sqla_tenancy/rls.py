"""DDL for row-level security: the SQL function policies call, and the per-table policies.

This is the one place that knows what the policies look like; :meth:`Tenancy.install`, the
placements and the Alembic extension all build their DDL from here.

Policies compare ``tenant_id`` with ``tenancy.current_tenant_id()``, which reads the
transaction-local setting ``app.current_tenant_id``. When no tenant is bound the function returns
NULL, the comparison is never true, and the table looks empty: fail closed.
"""

from __future__ import annotations

import uuid

from sqlalchemy import Table

from .identifiers import quote_ident

__all__ = [
    "ANONYMOUS_INFO_KEY",
    "TENANT_SETTING",
    "TENANT_ID_INFO_KEY",
    "current_tenant_function_ddl",
    "disable_rls_ddl",
    "fdw_role_name",
    "enable_rls_ddl",
    "is_tenant_scoped",
    "policy_names",
    "qualified_name",
]

#: The transaction-local setting that carries the tenant's id. Part of the public contract.
TENANT_SETTING = "app.current_tenant_id"
#: ``Column.info`` key that marks the tenant discriminator column of a table.
TENANT_ID_INFO_KEY = "sqla_tenancy.tenant_id"
#: ``Table.info`` key of a table anonymous requests may read: ``True`` (every row the tenant's
#: policies allow) or a SQL row filter (see :func:`~sqla_tenancy.models.anonymous_readable`).
ANONYMOUS_INFO_KEY = "sqla_tenancy.anonymous"

_ACTIONS = ("select", "insert", "update", "delete")


def fdw_role_name(tenant_id: uuid.UUID, prefix: str) -> str:
    """The login role a database tenant's postgres_fdw uses on the main database.

    The tenant's id is part of the name, so the policy function can tell the tenant from the
    session's identity: a role cannot rename itself, nor log in as another role.
    """
    return f"{prefix}_fdw_{tenant_id.hex}"


def current_tenant_function_ddl(schema: str = "tenancy", *, fdw_prefix: str | None = None) -> list[str]:
    """``<schema>.current_tenant_id()``: the bound tenant's id, or NULL when none is bound.

    With ``fdw_prefix`` (the main database), a session logged in as a database tenant's FDW role
    (see :func:`fdw_role_name`) gets *that role's* tenant, whatever ``app.current_tenant_id``
    says: the setting is an ordinary GUC the session could change, its login identity is not.
    Everyone else gets the transaction-local setting. Plain SQL, so the planner inlines it.
    """
    s = quote_ident(schema)
    setting = f"nullif(current_setting('{TENANT_SETTING}', true), '')::uuid"
    if fdw_prefix is None:
        body = f"SELECT {setting}"
    else:
        marker = f"{fdw_prefix}_fdw_"
        # The cast applies to the CASE, not inside it: an engine that evaluates the branches
        # eagerly (Citus evaluates stable expressions on the coordinator) must not cast another
        # role's name to uuid.
        body = (
            f"SELECT coalesce((CASE WHEN left(session_user::text, {len(marker)}) = '{marker}' "
            f"THEN substr(session_user::text, {len(marker) + 1}) END)::uuid, {setting})"
        )
    return [
        f"""
        CREATE OR REPLACE FUNCTION {s}.current_tenant_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL SAFE
        AS $$ {body} $$
        """,
    ]


def is_tenant_scoped(table: Table) -> bool:
    """True when the table has a tenant discriminator column (see :class:`TenantScoped`)."""
    return tenant_column_name(table) is not None


def tenant_column_name(table: Table) -> str | None:
    for column in table.columns:
        if column.info.get(TENANT_ID_INFO_KEY):
            return column.name
    return None


def qualified_name(table: Table) -> str:
    name = quote_ident(table.name)
    return f"{quote_ident(table.schema)}.{name}" if table.schema else name


def policy_names(table: Table) -> dict[str, str]:
    """The names of the four policies, by action."""
    return {action: f"tenancy_{action}" for action in _ACTIONS}


def enable_rls_ddl(table: Table, *, function_schema: str = "tenancy") -> list[str]:
    """ENABLE and FORCE row-level security on a tenant-scoped table, with one policy per action.

    FORCE makes the policies apply to the table's owner too; only superusers and BYPASSRLS roles
    (the admin role of :func:`platform_context`) see across tenants.
    """
    column = tenant_column_name(table)
    if column is None:
        raise ValueError(f"table {table.fullname!r} has no tenant_id column marked for tenancy")
    target = qualified_name(table)
    check = f"{quote_ident(column)} = {quote_ident(function_schema)}.current_tenant_id()"
    names = policy_names(table)
    statements = [
        f"ALTER TABLE {target} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {target} FORCE ROW LEVEL SECURITY",
    ]
    for action in _ACTIONS:
        statements.append(f"DROP POLICY IF EXISTS {quote_ident(names[action])} ON {target}")
    statements += [
        f"CREATE POLICY {quote_ident(names['select'])} ON {target} FOR SELECT USING ({check})",
        f"CREATE POLICY {quote_ident(names['insert'])} ON {target} FOR INSERT WITH CHECK ({check})",
        f"CREATE POLICY {quote_ident(names['update'])} ON {target} FOR UPDATE "
        f"USING ({check}) WITH CHECK ({check})",
        f"CREATE POLICY {quote_ident(names['delete'])} ON {target} FOR DELETE USING ({check})",
    ]
    return statements


def disable_rls_ddl(table: Table) -> list[str]:
    """The reverse of :func:`enable_rls_ddl`."""
    target = qualified_name(table)
    statements = [
        f"DROP POLICY IF EXISTS {quote_ident(name)} ON {target}" for name in policy_names(table).values()
    ]
    statements += [
        f"ALTER TABLE {target} NO FORCE ROW LEVEL SECURITY",
        f"ALTER TABLE {target} DISABLE ROW LEVEL SECURITY",
    ]
    return statements
