"""Database placement: each tenant has a database of its own, on the main cluster or on another
server, reaching the main database's infrastructure tables as postgres_fdw foreign tables.

Per tenant:

* a login role for the application, allowed to connect to that database only (``CONNECT`` is
  revoked from ``PUBLIC`` on tenant databases), and a NOLOGIN anonymous role it may switch to,
  which reads the opted-in tenant tables and no foreign table (see :mod:`sqla_tenancy.anonymous`);
* the database, cloned from a template database that holds the tenant tables (with their RLS),
  the ``tenancy.current_tenant_id()`` function and the postgres_fdw extension;
* on the main database, an FDW login role, NOBYPASSRLS, with privileges on the infrastructure
  schemas only. Its name carries the tenant's id, and the main database's
  ``tenancy.current_tenant_id()`` derives the tenant from that login identity: setting
  ``app.current_tenant_id`` through the foreign server changes nothing;
* in the tenant database: a foreign server for the main database, user mappings that log in as the
  FDW role with its password (clusters that require passwords need it), and ``IMPORT FOREIGN
  SCHEMA`` of each infrastructure schema into a schema of the same name.

Passwords are derived from ``Tenancy(secret_key=...)`` with HMAC-SHA256 and stored nowhere: not in
the registry, not in logs (PostgreSQL keeps the SCRAM verifier, and the user mapping the FDW
role's password, which only the mapping's owner and superusers can read).

``CREATE DATABASE`` cannot run in a transaction, so provisioning is a journal: the registry row
(status ``provisioning``, with every name it will create) is committed first; each step is
idempotent; on failure, or when a crashed attempt is found on retry, one idempotent clean-up
removes whatever exists of the tenant and the row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, create_engine, exc, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool as _NullPool

from ..anonymous import create_tenant_anonymous_role, grant_database_tenant
from ..binding import binding_statement
from ..dialect import DRIVER_NAME
from ..errors import ProvisioningError
from ..identifiers import database_name, quote_ident, quote_literal, role_name
from ..installer import tenants_group, tenants_group_grants
from ..registry import REGISTRY_SCHEMA
from ..rls import (
    current_tenant_function_ddl,
    fdw_role_name,
)
from .base import run_script
from .schema import tenant_ddl_template
from .shared import delete_tenant_rows, main_tenant_revision

if TYPE_CHECKING:
    from ..registry import Tenant
    from ..tenancy import Tenancy

__all__ = ["DatabaseStrategy", "derive_password", "scram_verifier", "template_lock_key"]

log = logging.getLogger(__name__)

FOREIGN_SERVER = "tenancy_main"


def template_lock_key(template: str) -> str:
    """The advisory lock (taken in the server admin URL's database) held while a template is
    cloned or migrated."""
    return f"sqla_tenancy:template:{template}"


def derive_password(secret: bytes, role: str) -> str:
    """The password of a per-tenant role: HMAC-SHA256 of the role name under the secret key."""
    digest = hmac.new(secret, f"sqla-tenancy:{role}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class Names:
    server: str
    database: str
    app_role: str
    fdw_role: str
    template: str
    anon_role: str

    def location(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "database": self.database,
            "role": self.app_role,
            "fdw_role": self.fdw_role,
        }


class DatabaseStrategy:
    """A database per tenant, with the infrastructure reached through postgres_fdw."""

    name = "database"
    transactional = False
    per_tenant_engines = True

    def __init__(self) -> None:
        self._templates_ready: set[tuple[int, str]] = set()

    # -- names and connections --------------------------------------------------------------

    def names(self, tenancy: Tenancy, tenant: Tenant, server: str | None = None) -> Names:
        server = server or tenant.location.get("server") or "main"
        return Names(
            server=server,
            database=database_name(tenant.slug, tenancy.name_prefix),
            app_role=role_name(tenant.slug, "app", tenancy.name_prefix),
            fdw_role=fdw_role_name(tenant.id, tenancy.name_prefix),
            template=f"{tenancy.name_prefix}_template",
            anon_role=role_name(tenant.slug, "anon", tenancy.name_prefix),
        )

    def _admin(
        self, tenancy: Tenancy, server: str, database: str | None = None, *, autocommit: bool = True
    ) -> Engine:
        """A short-lived admin engine on ``server`` (``CREATE DATABASE`` needs autocommit)."""
        url = tenancy.server_admin_url(server)
        if database is not None:
            url = url.set(database=database)
        if autocommit:
            return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=_NullPool)
        return create_engine(url, poolclass=_NullPool)

    def app_url(self, tenancy: Tenancy, tenant: Tenant) -> URL:
        names = self.names(tenancy, tenant)
        base = tenancy.server_admin_url(names.server)
        return base.set(
            drivername=f"postgresql+{DRIVER_NAME}",
            username=names.app_role,
            password=derive_password(tenancy.secret(), names.app_role),
            database=names.database,
        )

    # -- template -----------------------------------------------------------------------------

    def prepare_server(self, tenancy: Tenancy, superuser_url: URL, server: str) -> None:
        """One-time, superuser-only set-up of a server: the template database with postgres_fdw."""
        template = f"{tenancy.name_prefix}_template"
        admin_role = tenancy.server_admin_url(server).username
        assert admin_role
        su = create_engine(superuser_url, isolation_level="AUTOCOMMIT", poolclass=_NullPool)
        try:
            with su.connect() as conn:
                exists = conn.execute(
                    text("select 1 from pg_database where datname = :d"), {"d": template}
                ).first()
                if not exists:
                    conn.exec_driver_sql(
                        f"CREATE DATABASE {quote_ident(template)} OWNER {quote_ident(admin_role)}"
                    )
                conn.exec_driver_sql(f"REVOKE ALL ON DATABASE {quote_ident(template)} FROM PUBLIC")
        finally:
            su.dispose()
        su = create_engine(
            superuser_url.set(database=template), isolation_level="AUTOCOMMIT", poolclass=_NullPool
        )
        try:
            with su.connect() as conn:
                conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
                conn.exec_driver_sql(
                    f"GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO {quote_ident(admin_role)}"
                )
        finally:
            su.dispose()
        self.refresh_template(tenancy, server)

    def refresh_template(self, tenancy: Tenancy, server: str) -> None:
        """(Re)create the tenant tables and the policy function in the template database."""
        template = f"{tenancy.name_prefix}_template"
        engine = self._admin(tenancy, server, template, autocommit=False)
        try:
            with engine.begin() as conn:
                has_fdw = conn.execute(
                    text("select 1 from pg_extension where extname = 'postgres_fdw'")
                ).first()
                if not has_fdw:
                    raise ProvisioningError(
                        f"The template database {template!r} on server {server!r} lacks postgres_fdw. "
                        "Run tenancy.prepare_server(superuser_url) once (it needs a superuser)."
                    )
                conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {REGISTRY_SCHEMA}")
                for statement in current_tenant_function_ddl(REGISTRY_SCHEMA):
                    conn.exec_driver_sql(statement)
                have = set(
                    conn.execute(
                        text("select tablename from pg_tables where schemaname = 'public'")
                    ).scalars()
                )
                if not have:
                    script = tenant_ddl_template(tenancy)
                    if script:
                        run_script(conn, f"SET LOCAL search_path = public;\n{script}")
                    heads = tenancy.tenant_heads()
                    if heads is not None:
                        # Built from the models: at the tenant stream's head. From here on the
                        # fleet runner migrates the template like any tenant database.
                        from alembic_ext.versions import TENANT, version_table_script

                        run_script(conn, version_table_script(REGISTRY_SCHEMA, TENANT, heads))
        finally:
            engine.dispose()

    # -- provisioning -------------------------------------------------------------------------

    def provision(
        self, tenancy: Tenancy, tenant: Tenant, *, admin: Connection | None = None
    ) -> dict[str, Any]:
        names = self.names(tenancy, tenant)
        secret = tenancy.secret()
        tenancy._step("template")
        key = (id(tenancy), names.server)
        if key not in self._templates_ready:  # once per process and server (migrations refresh it)
            self.refresh_template(tenancy, names.server)
            self._templates_ready.add(key)
        server_engine = self._admin(tenancy, names.server)
        try:
            with server_engine.connect() as conn:  # one connection for both steps
                tenancy._step("app_role")
                _create_role(conn, names.app_role, derive_password(secret, names.app_role))
                create_tenant_anonymous_role(conn, names.anon_role, member=names.app_role)
                tenancy._step("database")
                database, app_role = quote_ident(names.database), quote_ident(names.app_role)
                strategy = tenancy.create_database_strategy
                option = f" STRATEGY = {strategy.upper()}" if strategy else ""
                # A migration of the template (alembic_ext) holds this lock while connected to
                # it; CREATE DATABASE refuses a template with other sessions.
                lock = template_lock_key(names.template)
                conn.execute(text("select pg_advisory_lock(hashtext(:k))"), {"k": lock})
                try:
                    conn.exec_driver_sql(
                        f"CREATE DATABASE {database} TEMPLATE {quote_ident(names.template)}{option}"
                    )
                finally:
                    conn.execute(text("select pg_advisory_unlock(hashtext(:k))"), {"k": lock})
                conn.exec_driver_sql(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
                conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {database} TO {app_role}")
        finally:
            server_engine.dispose()
        tenancy._step("fdw_role")
        with tenancy.admin_engine.begin() as conn:
            _create_role(conn, names.fdw_role, derive_password(secret, names.fdw_role), inherit=True)
            # CONNECT and the infrastructure privileges come with the tenants' group.
            group = quote_ident(tenants_group(tenancy))
            conn.exec_driver_sql(f"GRANT {group} TO {quote_ident(names.fdw_role)}")
        tenancy._step("fdw")
        revision = self.import_foreign_schemas(tenancy, tenant, names=names, create_server=True)
        return {**names.location(), "_revision": revision}

    def import_foreign_schemas(
        self, tenancy: Tenancy, tenant: Tenant, *, names: Names | None = None, create_server: bool = False
    ) -> str | None:
        """(Re)import every infrastructure schema into the tenant's database, in one transaction,
        so tenant queries never see a half-refreshed schema. Returns the database's tenant stream
        revision (None when its schema is not managed by migrations)."""
        names = names or self.names(tenancy, tenant)
        with tenancy.admin_engine.begin() as conn:  # new infrastructure tables: grant them first
            run_script(conn, ";\n".join(tenants_group_grants(tenancy)))
        # The admin URL reaches the main database directly (the application URL may go through a
        # transaction pooler, which postgres_fdw's sessions must not).
        main = tenancy.admin_url
        secret = tenancy.secret()
        engine = self._admin(tenancy, names.server, names.database, autocommit=False)
        admin_role = tenancy.server_admin_url(names.server).username or ""
        try:
            with engine.begin() as conn:
                statements = []
                if create_server:
                    statements += [
                        f"CREATE SERVER IF NOT EXISTS {FOREIGN_SERVER} FOREIGN DATA WRAPPER postgres_fdw "
                        f"OPTIONS (host {quote_literal(main.host or 'localhost')}, "
                        f"port {quote_literal(str(main.port or 5432))}, "
                        f"dbname {quote_literal(main.database or '')})",
                    ]
                    password = derive_password(secret, names.fdw_role)
                    for local in (names.app_role, admin_role):
                        statements.append(
                            f"CREATE USER MAPPING IF NOT EXISTS FOR {quote_ident(local)} SERVER "
                            f"{FOREIGN_SERVER} OPTIONS (user {quote_literal(names.fdw_role)}, "
                            f"password {quote_literal(password)})"
                        )
                    app = quote_ident(names.app_role)
                    statements += [
                        f"GRANT USAGE ON SCHEMA public TO {app}",
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app}",
                        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app}",
                        f"GRANT USAGE ON SCHEMA {REGISTRY_SCHEMA} TO {app}",
                        # tables and sequences later migrations create (they run as the admin role)
                        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public "
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app}",
                        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public "
                        f"GRANT USAGE, SELECT ON SEQUENCES TO {app}",
                    ]
                for schema in sorted(tenancy.infrastructure_schemas):
                    s = quote_ident(schema)
                    statements += [
                        f"DROP SCHEMA IF EXISTS {s} CASCADE",
                        f"CREATE SCHEMA {s}",
                        f"IMPORT FOREIGN SCHEMA {s} FROM SERVER {FOREIGN_SERVER} INTO {s}",
                        f"GRANT USAGE ON SCHEMA {s} TO {quote_ident(names.app_role)}",
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} "
                        f"TO {quote_ident(names.app_role)}",
                    ]
                run_script(conn, ";\n".join(statements))
                if create_server:
                    grant_database_tenant(conn, tenancy, names.anon_role)
                # Foreign tables do not apply the remote defaults: give them the portable ones.
                for schema, table, column, expression in self._remote_defaults(tenancy, tenant):
                    target = f"{quote_ident(schema)}.{quote_ident(table)}"
                    conn.exec_driver_sql("SAVEPOINT tenancy_default")
                    try:
                        conn.exec_driver_sql(
                            f"ALTER FOREIGN TABLE {target} ALTER COLUMN {quote_ident(column)} "
                            f"SET DEFAULT {expression}"
                        )
                    except exc.DBAPIError as error:
                        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT tenancy_default")
                        log.warning(
                            "no local default for %s.%s in tenant %s: %s",
                            target,
                            column,
                            tenant.slug,
                            error.orig,
                        )
                    else:
                        conn.exec_driver_sql("RELEASE SAVEPOINT tenancy_default")
                revision = main_tenant_revision(conn)
        finally:
            engine.dispose()
        return revision

    def _remote_defaults(self, tenancy: Tenancy, tenant: Tenant) -> list[tuple[str, str, str, str]]:
        """The infrastructure columns' defaults, as the foreign tables should have them: the
        policy function becomes this tenant's id; sequences are left to the main side's trigger
        (``tenancy.fill_serial``), since a tenant database cannot call a remote ``nextval``."""
        with tenancy.admin_engine.connect() as conn:
            rows = conn.execute(
                text(
                    "select n.nspname, c.relname, a.attname, pg_get_expr(d.adbin, d.adrelid) "
                    "from pg_attrdef d "
                    "join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum "
                    "join pg_class c on c.oid = d.adrelid "
                    "join pg_namespace n on n.oid = c.relnamespace "
                    "where n.nspname = any(:schemas) and c.relkind in ('r', 'p') "
                    "order by 1, 2, 3"
                ),
                {"schemas": sorted(tenancy.infrastructure_schemas)},
            ).all()
        tenant_literal = f"{quote_literal(str(tenant.id))}::uuid"
        defaults = []
        for schema, table, column, expression in rows:
            if "nextval(" in expression:
                continue
            if "current_tenant_id()" in expression:
                expression = tenant_literal
            defaults.append((schema, table, column, expression))
        return defaults

    def compensate(self, tenancy: Tenancy, tenant: Tenant) -> None:
        """Remove whatever exists of the tenant's storage and roles (idempotent)."""
        names = self.names(tenancy, tenant)
        tenancy.tenant_engines.discard(lambda key: key[0] == tenant.id)  # type: ignore[index]
        server_engine = self._admin(tenancy, names.server)
        try:
            with server_engine.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote_ident(names.database)} WITH (FORCE)")
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {quote_ident(names.app_role)}")
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {quote_ident(names.anon_role)}")
        finally:
            server_engine.dispose()
        with tenancy.admin_engine.begin() as conn:
            # its only privileges come from the group membership, which DROP ROLE removes
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {quote_ident(names.fdw_role)}")

    def deprovision(
        self, tenancy: Tenancy, tenant: Tenant, *, admin: Connection | None, keep_infrastructure_rows: bool
    ) -> None:
        if not keep_infrastructure_rows:
            with tenancy.admin_engine.begin() as conn:
                delete_tenant_rows(tenant, reversed(tenancy.infrastructure_tables()), admin=conn)
        self.compensate(tenancy, tenant)

    # -- routing ------------------------------------------------------------------------------

    def binding(self, tenancy: Tenancy, tenant: Tenant) -> bytes:
        # The pool serves this tenant only, its full and its anonymous transactions alike: pin
        # the role and the path all the same, and the setting for RLS on the tenant's own tables.
        return binding_statement(tenant.id)

    def anonymous_binding(self, tenancy: Tenancy, tenant: Tenant) -> bytes:
        return binding_statement(tenant.id, role=self.names(tenancy, tenant).anon_role)

    def engine(self, tenancy: Tenancy, tenant: Tenant, *, async_: bool) -> Engine:
        return tenancy._tenant_engine(tenant, self.app_url(tenancy, tenant), async_=async_)


def _create_role(conn: Connection, role: str, password: str, *, inherit: bool = False) -> None:
    exists = conn.execute(text("select 1 from pg_roles where rolname = :r"), {"r": role}).first()
    if exists:
        raise ProvisioningError(
            f"Role {role!r} exists already (roles are cluster-wide: is another application on this "
            "cluster using the same name_prefix?). Give Tenancy a distinct name_prefix, or drop it."
        )
    # Only a SCRAM verifier goes over the wire (and into any server log), never the password.
    run_script(
        conn,
        f"CREATE ROLE {quote_ident(role)} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
        f"{'INHERIT' if inherit else 'NOINHERIT'} PASSWORD {quote_literal(scram_verifier(password))}",
    )


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The ``SCRAM-SHA-256$...`` verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    Derived passwords are ASCII, so SASLprep leaves them unchanged.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )
