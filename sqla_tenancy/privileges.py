"""What the admin role must be allowed to do, checked before any DDL, and the SQL that grants it.

``install()``, the Alembic extension and the provisioning of schema and database tenants create
roles, schemas and databases as the admin role (``admin_url``). A role that lacks one of the
attributes would fail half-way with ``permission denied to create role``; this module names what
is missing, up front, with the ``ALTER ROLE`` a superuser runs to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection

from .errors import ConfigurationError
from .identifiers import quote_ident

__all__ = ["ADMIN_ATTRIBUTES", "require_admin_attributes", "setup_sql"]

#: role attribute -> why the admin role needs it
ADMIN_ATTRIBUTES = {
    "CREATEROLE": "install() creates the tenants' group role; schema and database tenants get roles",
    "BYPASSRLS": "platform_context() reads and writes every tenant's rows as the admin role",
    "CREATEDB": "database tenants get a database of their own",
}

_COLUMNS = {"CREATEROLE": "rolcreaterole", "BYPASSRLS": "rolbypassrls", "CREATEDB": "rolcreatedb"}


def require_admin_attributes(conn: Connection, needed: Iterable[str], *, doing: str) -> None:
    """Raise :class:`ConfigurationError` naming every attribute of ``needed`` that the role of
    ``conn`` lacks (a superuser has them all), with the statement that grants them."""
    wanted = list(needed)
    row = conn.exec_driver_sql(
        "select rolname, rolsuper, "
        + ", ".join(_COLUMNS[a] for a in wanted)
        + " from pg_roles where rolname = current_user"
    ).one()
    role, superuser, *held = row
    if superuser:
        return
    missing = [a for a, has in zip(wanted, held, strict=True) if not has]
    if not missing:
        return
    reasons = "; ".join(f"{a}: {ADMIN_ATTRIBUTES[a]}" for a in missing)
    raise ConfigurationError(
        f"{doing} needs the admin role {role!r} to have {' and '.join(missing)} ({reasons}). "
        f"As a superuser, run: ALTER ROLE {quote_ident(role)} {' '.join(missing)};"
    )


def setup_sql(
    *,
    database: str = "app",
    app_role: str = "app_user",
    admin_role: str = "app_admin",
    app_password: str = "...",
    admin_password: str = "...",
) -> list[str]:
    """The statements a superuser runs once to set up the two roles and the main database, as
    ``docs/quickstart.md`` shows them and ``sqla-tenancy dev-server`` runs them."""
    from .identifiers import quote_literal

    admin, app, db = quote_ident(admin_role), quote_ident(app_role), quote_ident(database)
    return [
        f"CREATE ROLE {admin} LOGIN CREATEROLE CREATEDB BYPASSRLS PASSWORD {quote_literal(admin_password)}",
        f"CREATE ROLE {app} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD {quote_literal(app_password)}",
        f"CREATE DATABASE {db} OWNER {admin}",
        f"REVOKE ALL ON DATABASE {db} FROM PUBLIC",
        f"GRANT CONNECT ON DATABASE {db} TO {app}",
    ]
