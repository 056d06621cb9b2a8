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

``CREATE DATABASE`` cannot run in a transaction, so provisioning is journaled: the registry row
(status ``provisioning``) is committed first, and each object is written to its ``journal``
before it is created. Every object provisioning creates also carries a marker, the comment
``created by sqla-tenancy for tenant <id>``, set in the transaction that creates it; the database,
whose ``CREATE`` cannot share a transaction, is created under a temporary name of this attempt's
own, marked, and only then renamed. On failure, or when a crashed attempt is found on retry, the
clean-up drops what the journal names and what carries the marker, and nothing else: a database
or role that exists under the tenant's name without being this tenant's is left alone. Names
that exist already are refused before anything is created.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, create_engine, exc, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool as _NullPool

from .. import locks
from ..anonymous import (
    create_tenant_anonymous_role,
    grant_database_tenant,
    refuse_existing_role,
    role_exists,
)
from ..binding import binding_statement, migration_binding_statement
from ..dialect import DRIVER_NAME
from ..errors import DeletionError, ProvisioningError
from ..grants import tenants_group, tenants_group_grants
from ..identifiers import database_name, quote_ident, quote_literal, role_name
from ..passwords import derive_password, scram_verifier
from ..privileges import require_admin_attributes
from ..registry import REGISTRY_SCHEMA, TenantStore
from ..rls import (
    current_tenant_function_ddl,
    fdw_role_name,
)
from .base import MigrationSite, PlacementBase, run_script
from .schema import tenant_ddl_template
from .shared import delete_tenant_rows, main_tenant_revision

if TYPE_CHECKING:
    from ..config import TenancyConfig
    from ..engines import Engines
    from ..registry import Tenant
    from ..steps import Steps

__all__ = [
    "DatabasePlacement",
    "OpenDatabase",
    "creation_marker",
    "databases_open_to",
    "derive_password",
    "maintenance_databases",
    "scram_verifier",
    "template_database",
]

log = logging.getLogger(__name__)
#: Where privileges that weaken isolation are reported (an operator may route it to an alert).
isolation_log = logging.getLogger("sqla_tenancy.isolation")

FOREIGN_SERVER = "tenancy_main"

#: The key of the registry row's ``location`` that journals a provisioning's objects, one
#: ``{"kind", "server", "name"}`` entry each (dropped when the tenant is activated).
_JOURNAL = "journal"


def template_database(config: TenancyConfig) -> str:
    """The template database every tenant database is cloned from, on each server."""
    return f"{config.name_prefix}_template"


def creation_marker(tenant: Tenant) -> str:
    """The comment provisioning gives every database and role it creates for ``tenant``: what
    tells the clean-up, after a crash, that an object under the tenant's name is its own."""
    return f"created by sqla-tenancy for tenant {tenant.id}"


@dataclass(frozen=True)
class OpenDatabase:
    """A database that a role can connect to and should not."""

    name: str
    #: True when the role may connect because ``PUBLIC`` may (the default ``CREATE DATABASE``
    #: gives); False when ``CONNECT`` was granted to it, or to a role it inherits from.
    public: bool

    def fix(self, role: str) -> str:
        """The SQL that takes the access back (as the database's owner or a superuser)."""
        database = quote_ident(self.name)
        if self.public:
            return f"REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC"
        return f"REVOKE CONNECT ON DATABASE {database} FROM {quote_ident(role)}"


def databases_open_to(conn: Connection, role: str, *, besides: Iterable[str] = ()) -> list[OpenDatabase]:
    """The databases of ``conn``'s server, other than ``besides``, that ``role`` may connect to.

    A database tenant's login role should reach its own database and nothing else, but
    ``CREATE DATABASE`` lets ``PUBLIC`` connect to every new database; the maintenance databases
    (``postgres``, ``template1``) and any database made outside sqla-tenancy stay open unless
    somebody takes that back. Databases that accept no connection at all (``template0``) are left
    out."""
    rows = conn.execute(
        text(
            "select datname, has_database_privilege('public', oid, 'CONNECT') from pg_database "
            "where datallowconn and datname <> all(:besides) "
            "and has_database_privilege(:role, oid, 'CONNECT') order by datname"
        ),
        {"role": role, "besides": list(besides)},
    ).all()
    return [OpenDatabase(name, bool(public)) for name, public in rows]


def maintenance_databases(config: TenancyConfig, superuser_url: URL, server: str) -> list[str]:
    """The databases ``prepare_server`` closes to ``PUBLIC`` on ``server`` (those that exist):
    ``postgres``, ``template1``, the superuser URL's database and the server admin URL's. The
    main database is :meth:`Tenancy.install`'s to restrict, and is left out."""
    names = {"postgres", "template1", superuser_url.database, config.server_admin_url(server).database}
    if server == "main":
        names -= {config.admin_url.database, config.url.database}
    return sorted(name for name in names if name)


@dataclass(frozen=True)
class Names:
    server: str
    database: str
    app_role: str
    fdw_role: str
    template: str
    anon_role: str
    #: what the database is created as, marked, and renamed from: carries the tenant's id and a
    #: ``-``, which no slug can, so that no other object can ever have this name
    temporary: str

    def location(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "database": self.database,
            "role": self.app_role,
            "fdw_role": self.fdw_role,
        }


class DatabasePlacement(PlacementBase):
    """A database per tenant, with the infrastructure reached through postgres_fdw."""

    name = "database"
    transactional = False
    admitted = False
    per_tenant_engines = True

    def __init__(self, config: TenancyConfig, engines: Engines, steps: Steps) -> None:
        super().__init__(config, engines, steps)
        #: servers whose template this process has brought up to date (migrations refresh it too)
        self._templates_ready: set[str] = set()

    # -- names and connections --------------------------------------------------------------

    def names(self, tenant: Tenant, server: str | None = None) -> Names:
        server = server or tenant.location.get("server") or "main"
        return Names(
            server=server,
            database=database_name(tenant.slug, self.config.name_prefix),
            app_role=role_name(tenant.slug, "app", self.config.name_prefix),
            fdw_role=fdw_role_name(tenant.id, self.config.name_prefix),
            template=template_database(self.config),
            anon_role=role_name(tenant.slug, "anon", self.config.name_prefix),
            temporary=f"{self.config.name_prefix}-new-{tenant.id.hex}",
        )

    def derived_names(self, tenant: Tenant) -> dict[tuple[str, str], str]:
        """What provisioning ``tenant`` would create, as ``{(kind, name): what it is}`` (kinds:
        ``database``, ``schema``, ``role``), for the check against the library's own names."""
        names = self.names(tenant)
        return {
            ("database", names.database): "database",
            ("role", names.app_role): "login role",
            ("role", names.anon_role): "anonymous role",
            ("role", names.fdw_role): "FDW role",
        }

    def _admin(self, server: str, database: str | None = None, *, autocommit: bool = True) -> Engine:
        """A short-lived admin engine on ``server`` (``CREATE DATABASE`` needs autocommit)."""
        url = self.config.server_admin_url(server)
        if database is not None:
            url = url.set(database=database)
        if autocommit:
            return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=_NullPool)
        return create_engine(url, poolclass=_NullPool)

    def app_url(self, tenant: Tenant, *, pooled: bool = False) -> URL:
        """The URL of the tenant's own role on its own database: with ``pooled``, through the
        server's pooler when ``tenant_poolers`` names one (the tenant's engines), else direct
        (``run_sql``, whose scripts may hold a session)."""
        names = self.names(tenant)
        base = (
            self.config.tenant_address(names.server) if pooled else self.config.server_admin_url(names.server)
        )
        return base.set(
            drivername=f"postgresql+{DRIVER_NAME}",
            username=names.app_role,
            password=derive_password(self.config.secret(), names.app_role),
            database=names.database,
        )

    def rehash_passwords(self, tenant: Tenant) -> None:
        """Give the tenant's login roles (application, on its server; FDW, on the main one) new
        SCRAM verifiers of their same passwords, with ``tenant_scram_iterations`` iterations.
        Open connections are unaffected; new ones authenticate against the new verifiers."""
        names = self.names(tenant)
        secret = self.config.secret()
        app_role = str(tenant.location.get("role") or names.app_role)
        fdw_role = str(tenant.location.get("fdw_role") or names.fdw_role)
        server = self._admin(names.server, autocommit=False)
        try:
            with server.begin() as conn:
                _set_password(conn, app_role, derive_password(secret, app_role), self.config)
        finally:
            server.dispose()
        with self.engines.admin.begin() as conn:
            _set_password(conn, fdw_role, derive_password(secret, fdw_role), self.config)

    # -- template -----------------------------------------------------------------------------

    def prepare_server(
        self,
        superuser_url: URL,
        server: str,
        *,
        restrict_maintenance_databases: bool = True,
    ) -> None:
        """One-time, superuser-only set-up of a server: the template database with postgres_fdw,
        and (unless declined) the maintenance databases closed to ``PUBLIC``, so that tenants'
        login roles cannot open them (see :func:`maintenance_databases`)."""
        template = template_database(self.config)
        admin_role = self.config.server_admin_url(server).username
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
                if restrict_maintenance_databases:
                    admin_database = self.config.server_admin_url(server).database
                    databases = maintenance_databases(self.config, superuser_url, server)
                    _restrict(conn, databases, grant=(admin_role, admin_database))
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
        self.refresh_template(server)

    def refresh_template(self, server: str) -> None:
        """(Re)create the tenant tables and the policy function in the template database.

        Under the template's lock, held in the server admin URL's database: each process's first
        provisioning refreshes the template, and two ``CREATE OR REPLACE FUNCTION`` at once fail
        with ``tuple concurrently updated``; ``CREATE DATABASE`` (which holds the same lock)
        refuses a template that has other sessions."""
        template = template_database(self.config)
        guard = self._admin(server)
        try:
            with guard.connect() as conn, locks.session_lock(conn, locks.template_key(template)):
                self._refresh_template(server, template)
        finally:
            guard.dispose()

    def _refresh_template(self, server: str, template: str) -> None:
        engine = self._admin(server, template, autocommit=False)
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
                    script = tenant_ddl_template(self.config)
                    if script:
                        run_script(conn, f"SET LOCAL search_path = public;\n{script}")
                    heads = self.config.tenant_heads()
                    if heads is not None:
                        # Built from the models: at the tenant stream's head. From here on the
                        # fleet runner migrates the template like any tenant database.
                        from ..versions import TENANT, version_table_script

                        run_script(conn, version_table_script(REGISTRY_SCHEMA, TENANT, heads))
        finally:
            engine.dispose()

    # -- provisioning -------------------------------------------------------------------------

    def initial_location(self, server: str | None) -> dict[str, Any]:
        self.config.server_admin_url(server or "main")  # ProvisioningError for an unknown server
        return {"server": server or "main"}

    def provision(self, tenant: Tenant, *, admin: Connection | None = None) -> dict[str, Any]:
        names = self.names(tenant)

        def journal(*entries: dict[str, str]) -> None:
            _journal(self.engines.admin, tenant, *entries)

        return self._provision(tenant, names, final=names, journal=journal, fdw_role=True)

    def provision_move_target(
        self,
        tenant: Tenant,
        server: str,
        *,
        journal: Callable[..., None],
        temporary_roles: bool,
        fdw_role: bool,
    ) -> tuple[Names, dict[str, Any]]:
        """Provision the database ``tenant`` is being moved to, on ``server``, journaling each
        object with ``journal(*entries)`` before it is created (:func:`compensate_entries` undoes
        them). ``temporary_roles``: the login and anonymous roles are created under names of this
        move's own (the source still holds the final ones on this cluster), with the passwords
        of the final names, and renamed with :func:`rename_roles_sql` when the source's go.
        ``fdw_role=False``: the source's FDW role (a database tenant's, named by its id) serves
        the target too. Returns the names used and the location the registry keeps."""
        final = self.names(tenant, server)
        names = final
        if temporary_roles:
            stem = f"{self.config.name_prefix}-mv-{tenant.id.hex}"
            names = dataclasses.replace(final, app_role=f"{stem}-app", anon_role=f"{stem}-anon")
        location = self._provision(tenant, names, final=final, journal=journal, fdw_role=fdw_role)
        return names, {**location, "role": final.app_role}

    def rename_roles_sql(self, tenant: Tenant, used: Names) -> list[str]:
        """The statements giving a move target's temporary roles their final names."""
        final = self.names(tenant, used.server)
        return [
            f"ALTER ROLE {quote_ident(old)} RENAME TO {quote_ident(new)}"
            for old, new in ((used.app_role, final.app_role), (used.anon_role, final.anon_role))
            if old != new
        ]

    def _provision(
        self,
        tenant: Tenant,
        names: Names,
        *,
        final: Names,
        journal: Callable[..., None],
        fdw_role: bool,
    ) -> dict[str, Any]:
        secret = self.config.secret()
        self._refuse_existing(tenant, names, fdw_role=fdw_role)
        checker = self._admin(names.server, autocommit=False)
        try:
            with checker.connect() as conn:
                require_admin_attributes(
                    conn, ("CREATEROLE", "CREATEDB"), doing=f"Creating database tenant {tenant.slug!r}"
                )
        finally:
            checker.dispose()
        marker = quote_literal(creation_marker(tenant))
        self.steps("template")
        key = names.server
        if key not in self._templates_ready:  # once per process and server (migrations refresh it)
            self.refresh_template(names.server)
            self._templates_ready.add(key)
        journal(_role_entry(names.server, names.app_role), _role_entry(names.server, names.anon_role))
        self.steps("app_role")
        roles = self._admin(names.server, autocommit=False)
        try:
            with roles.begin() as conn:  # both roles with their markers, or nothing
                _create_role(conn, names.app_role, derive_password(secret, final.app_role), self.config)
                create_tenant_anonymous_role(conn, names.anon_role, member=names.app_role)
                for role in (names.app_role, names.anon_role):
                    conn.exec_driver_sql(f"COMMENT ON ROLE {quote_ident(role)} IS {marker}")
        finally:
            roles.dispose()
        journal(_database_entry(names))
        self.steps("database")
        server_engine = self._admin(names.server)
        try:
            with server_engine.connect() as conn:
                temporary, app_role = quote_ident(names.temporary), quote_ident(names.app_role)
                strategy = self.config.create_database_strategy
                option = f" STRATEGY = {strategy.upper()}" if strategy else ""
                # A migration of the template (alembic_ext) holds this lock while connected to
                # it; CREATE DATABASE refuses a template with other sessions.
                with locks.session_lock(conn, locks.template_key(names.template)):
                    conn.exec_driver_sql(
                        f"CREATE DATABASE {temporary} TEMPLATE {quote_ident(names.template)}{option}"
                    )
                conn.exec_driver_sql(f"COMMENT ON DATABASE {temporary} IS {marker}")
                conn.exec_driver_sql(f"REVOKE ALL ON DATABASE {temporary} FROM PUBLIC")
                conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {temporary} TO {app_role}")
                self.steps("rename_database")
                # Refused if the name was taken since _refuse_existing: nothing of theirs is touched.
                conn.exec_driver_sql(f"ALTER DATABASE {temporary} RENAME TO {quote_ident(names.database)}")
                _warn_open(conn, tenant, names.app_role, "login role", names.server, own=names.database)
        finally:
            server_engine.dispose()
        if fdw_role:
            journal(_role_entry("main", names.fdw_role))
            self.steps("fdw_role")
            with self.engines.admin.begin() as conn:
                _create_role(
                    conn, names.fdw_role, derive_password(secret, names.fdw_role), self.config, inherit=True
                )
                conn.exec_driver_sql(f"COMMENT ON ROLE {quote_ident(names.fdw_role)} IS {marker}")
                # CONNECT and the infrastructure privileges come with the tenants' group.
                group = quote_ident(tenants_group(self.config))
                conn.exec_driver_sql(f"GRANT {group} TO {quote_ident(names.fdw_role)}")
                main_database = self.config.admin_url.database or ""
                _warn_open(conn, tenant, names.fdw_role, "FDW role", "main", own=main_database)
        self.steps("fdw")
        revision = self.import_foreign_schemas(tenant, names=names, create_server=True)
        return {**names.location(), "_revision": revision}

    def _refuse_existing(self, tenant: Tenant, names: Names, *, fdw_role: bool = True) -> None:
        """Refuse, before anything is created, a database or role that exists under one of the
        tenant's names: provisioning neither adopts such an object nor, on failure, drops it."""
        engine = self._admin(names.server)
        try:
            with engine.connect() as conn:
                if conn.execute(
                    text("select 1 from pg_database where datname = :d"), {"d": names.database}
                ).first():
                    raise ProvisioningError(
                        f"The database {names.database!r} exists already on server {names.server!r}, "
                        f"and tenant {tenant.slug!r} did not create it; sqla-tenancy neither adopts "
                        "nor drops it. Drop or rename it if it is a leftover, or give Tenancy a "
                        "distinct name_prefix if another application uses these names."
                    )
                for role in (names.app_role, names.anon_role):
                    refuse_existing_role(conn, role)
        finally:
            engine.dispose()
        if fdw_role:
            with self.engines.admin.connect() as conn:
                refuse_existing_role(conn, names.fdw_role)

    def import_foreign_schemas(
        self, tenant: Tenant, *, names: Names | None = None, create_server: bool = False
    ) -> str | None:
        """(Re)import every infrastructure schema into the tenant's database, in one transaction,
        so tenant queries never see a half-refreshed schema. Returns the database's tenant stream
        revision (None when its schema is not managed by migrations)."""
        names = names or self.names(tenant)
        with self.engines.admin.begin() as conn:  # new infrastructure tables: grant them first
            grants = [locks.xact_lock_sql(locks.GRANTS_KEY), *tenants_group_grants(self.config)]
            run_script(conn, ";\n".join(grants))
        # The admin URL's address (or fdw_host/fdw_port) reaches the main database directly (the
        # application URL may go through a transaction pooler, which postgres_fdw's sessions must not).
        host, port, dbname = self.config.fdw_address()
        secret = self.config.secret()
        engine = self._admin(names.server, names.database, autocommit=False)
        admin_role = self.config.server_admin_url(names.server).username or ""
        try:
            with engine.begin() as conn:
                statements = []
                if create_server:
                    statements += [
                        f"CREATE SERVER IF NOT EXISTS {FOREIGN_SERVER} FOREIGN DATA WRAPPER postgres_fdw "
                        f"OPTIONS (host {quote_literal(host)}, port {quote_literal(str(port))}, "
                        f"dbname {quote_literal(dbname)})",
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
                for schema in sorted(self.config.infrastructure_schemas):
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
                    grant_database_tenant(conn, self.config, names.anon_role)
                # Foreign tables do not apply the remote defaults: give them the portable ones.
                for schema, table, column, expression in self._remote_defaults(tenant):
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

    def _remote_defaults(self, tenant: Tenant) -> list[tuple[str, str, str, str]]:
        """The infrastructure columns' defaults, as the foreign tables should have them: the
        policy function becomes this tenant's id; sequences are left to the main side's trigger
        (``tenancy.fill_serial``), since a tenant database cannot call a remote ``nextval``."""
        with self.engines.admin.connect() as conn:
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
                {"schemas": sorted(self.config.infrastructure_schemas)},
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

    def compensate(self, tenant: Tenant) -> None:
        """Undo a provisioning of ``tenant`` that failed or crashed, from its journal: drop each
        journaled database and role that exists and carries the tenant's marker (and the
        attempt's temporary database, whose name is the attempt's own). An object under a
        journaled name without the marker was not made by this tenant: it is left alone, with a
        warning. Idempotent. Raises :class:`ProvisioningError` if something could not be dropped;
        the registry row then stays, so that a retry cleans up again."""
        self.engines.tenants.discard(lambda key: key[0] == tenant.id)  # type: ignore[index]
        marker = creation_marker(tenant)
        failures: list[str] = []
        for entry in reversed(self._journal_of(tenant)):
            try:
                self._undo(tenant, entry, marker)
            except (exc.DBAPIError, ProvisioningError) as error:
                failures.append(f"{entry.get('kind')} {entry.get('name')!r}: {getattr(error, 'orig', error)}")
        if failures:
            raise ProvisioningError(
                f"Cleaning up the failed provisioning of tenant {tenant.slug!r} left {'; '.join(failures)}. "
                f"Its registry row is kept: once the cause is fixed, create_tenant({tenant.slug!r}, "
                "placement='database') cleans up again."
            )

    def compensate_entries(self, tenant: Tenant, entries: list[dict[str, Any]]) -> None:
        """Undo the objects ``entries`` journal (a failed move's target), last first, as
        :meth:`compensate` does: only what carries the tenant's marker is dropped."""
        marker = creation_marker(tenant)
        failures: list[str] = []
        for entry in reversed(entries):
            try:
                self._undo(tenant, entry, marker)
            except (exc.DBAPIError, ProvisioningError) as error:
                failures.append(f"{entry.get('kind')} {entry.get('name')!r}: {getattr(error, 'orig', error)}")
        if failures:
            raise ProvisioningError(f"left {'; '.join(failures)}")

    def drop_moved_source(self, tenant: Tenant, source: dict[str, Any]) -> None:
        """Remove the database a tenant was moved away from (``source``: its ``server``,
        ``database``, ``roles`` there and, unless the target kept it, ``fdw_role``): its roles
        stop logging in and their sessions end, then the database and the roles go. Idempotent."""
        self.engines.tenants.discard(lambda key: key[0] == tenant.id)  # type: ignore[index]
        server, database = str(source["server"]), str(source["database"])
        roles = [str(r) for r in source.get("roles", [])]
        fdw_role = source.get("fdw_role")
        self._stop_sessions(tenant, server, roles)
        if fdw_role:
            with self.engines.admin.connect() as conn:
                _end_sessions(conn, tenant, "main", [str(fdw_role)])
        engine = self._admin(server)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote_ident(database)} WITH (FORCE)")
                for role in roles:
                    conn.exec_driver_sql(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        finally:
            engine.dispose()
        if fdw_role:
            with self.engines.admin.begin() as conn:
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {quote_ident(str(fdw_role))}")

    def admin_engine(self, server: str, database: str, *, autocommit: bool = False) -> Engine:
        """A short-lived admin engine on ``database`` of ``server`` (dispose it after use)."""
        return self._admin(server, database, autocommit=autocommit)

    def _journal_of(self, tenant: Tenant) -> list[dict[str, Any]]:
        """The journal of ``tenant``'s provisioning, from its registry row. Should the row be gone
        (deleted while the tenant was being provisioned), every object provisioning would have
        journaled: each is dropped only if it carries the tenant's marker, so only what the
        provisioning created goes."""
        with self.engines.admin.connect() as conn:
            row = TenantStore().get(conn, tenant.id)
        location = row.location if row is not None else None
        if location is None:
            names = self.names(tenant)
            return [
                _role_entry(names.server, names.app_role),
                _role_entry(names.server, names.anon_role),
                _database_entry(names),
                _role_entry("main", names.fdw_role),
            ]
        journal = location.get(_JOURNAL, [])
        return [entry for entry in journal if isinstance(entry, dict)] if isinstance(journal, list) else []

    def _undo(self, tenant: Tenant, entry: dict[str, Any], marker: str) -> None:
        kind, name, server = entry.get("kind"), entry.get("name"), entry.get("server", "main")
        if kind not in ("database", "role") or not isinstance(name, str) or not isinstance(server, str):
            raise ProvisioningError(f"unreadable journal entry {entry!r}")
        lookup = (
            "select shobj_description(oid, 'pg_database') from pg_database where datname = :n"
            if kind == "database"
            else "select shobj_description(oid, 'pg_authid') from pg_roles where rolname = :n"
        )
        engine = self._admin(server)
        try:
            with engine.connect() as conn:
                temporary = entry.get("temporary")
                if kind == "database" and isinstance(temporary, str):
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote_ident(temporary)} WITH (FORCE)")
                found = conn.execute(text(lookup), {"n": name}).first()
                if found is None:
                    return
                if found[0] != marker:
                    log.warning(
                        "clean-up of tenant %s: the %s %r on server %r does not carry its marker, "
                        "so the tenant's provisioning did not create it; left alone",
                        tenant.slug,
                        kind,
                        name,
                        server,
                    )
                    return
                statement = "DROP DATABASE {} WITH (FORCE)" if kind == "database" else "DROP ROLE {}"
                conn.exec_driver_sql(statement.format(quote_ident(name)))
        finally:
            engine.dispose()

    def deprovision(
        self, tenant: Tenant, *, admin: Connection | None, keep_infrastructure_rows: bool
    ) -> None:
        """Stop the tenant everywhere, then remove it, in an order where a failure leaves its data
        whole or its own database already gone, never half of it:

        1. its login roles (the tenant's on its server, the FDW role on the main database) may
           no longer log in, and their sessions are ended: no transaction of the tenant still
           in flight in any process can commit afterwards, on either side;
        2. ``DROP DATABASE ... WITH (FORCE)``: the tenant's own data, all at once;
        3. its roles on its server; then, in one transaction on the main database, its rows in
           the infrastructure tables (unless kept) and its FDW role.

        Every step is idempotent: a deletion that stopped part way is finished by running it again.
        """
        self.engines.tenants.discard(lambda key: key[0] == tenant.id)  # type: ignore[index]
        if _JOURNAL in tenant.location:  # never activated: only what its journal names
            self.compensate(tenant)
            if not keep_infrastructure_rows:
                with self.engines.admin.begin() as conn:
                    delete_tenant_rows(tenant, reversed(self.config.infrastructure_tables()), admin=conn)
            return
        # An active tenant's objects are the ones its registry row names.
        names = self.names(tenant)
        database = tenant.location.get("database", names.database)
        app_role = tenant.location.get("role", names.app_role)
        fdw_role = tenant.location.get("fdw_role", names.fdw_role)
        self._stop_sessions(tenant, names.server, [app_role, names.anon_role])
        with self.engines.admin.connect() as conn:
            _end_sessions(conn, tenant, "main", [fdw_role])
        server_engine = self._admin(names.server)
        try:
            with server_engine.connect() as conn:
                try:
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote_ident(database)} WITH (FORCE)")
                except exc.DBAPIError as error:
                    raise DeletionError(
                        f"Tenant {tenant.slug!r} is refused everywhere and its sessions were ended, "
                        f"but its database {database!r} on server {names.server!r} could not be "
                        f"dropped ({error.orig}); none of its data was removed. A superuser's "
                        "session in that database can only be ended by a superuser: end it, then "
                        f"rerun delete_tenant({tenant.slug!r})."
                    ) from error
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {quote_ident(app_role)}")
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {quote_ident(names.anon_role)}")
        finally:
            server_engine.dispose()
        with self.engines.admin.begin() as conn:
            if not keep_infrastructure_rows:
                delete_tenant_rows(tenant, reversed(self.config.infrastructure_tables()), admin=conn)
            # its only privileges come from the group membership, which DROP ROLE removes
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {quote_ident(fdw_role)}")

    def _stop_sessions(self, tenant: Tenant, server: str, roles: list[str]) -> None:
        engine = self._admin(server)
        try:
            with engine.connect() as conn:
                _end_sessions(conn, tenant, server, roles)
        finally:
            engine.dispose()

    # -- routing ------------------------------------------------------------------------------

    def migration_site(self, tenant: Tenant) -> MigrationSite | None:
        names = self.names(tenant)
        return MigrationSite("database", server=names.server, database=names.database)

    def migration_binding(self, tenant: Tenant) -> str:
        return migration_binding_statement(tenant.id)

    def after_migration(self, conn: Connection, tenant: Tenant, *, created: bool) -> None:
        names = self.names(tenant)
        app = quote_ident(names.app_role)
        conn.exec_driver_sql(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app}; "
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app}"
        )
        if role_exists(conn, names.anon_role):  # tenants created before anonymous roles existed
            grant_database_tenant(conn, self.config, names.anon_role, fresh=False)

    def dump_target(self, tenant: Tenant) -> tuple[URL, str] | None:
        # its public schema: the foreign schemas, the foreign server and the user mappings (which
        # hold a password) stay out
        names = self.names(tenant)
        return self.config.server_admin_url(names.server).set(database=names.database), "public"

    def binding(self, tenant: Tenant) -> bytes:
        # The pool serves this tenant only, its full and its anonymous transactions alike: pin
        # the role and the path all the same, and the setting for RLS on the tenant's own tables.
        return binding_statement(tenant.id)

    def anonymous_binding(self, tenant: Tenant) -> bytes:
        return binding_statement(tenant.id, role=self.names(tenant).anon_role)

    def engine(self, tenant: Tenant, *, async_: bool) -> Engine:
        poolers = self.config.tenant_poolers
        pooled = bool(poolers) and (tenant.location.get("server") or "main") in poolers
        return self.engines.tenant(
            tenant.id, lambda: self.app_url(tenant, pooled=True), async_=async_, pooled=pooled
        )


def _end_sessions(conn: Connection, tenant: Tenant, server: str, roles: list[str]) -> None:
    """As the admin role on ``conn`` (autocommit): refuse new logins of ``roles`` and end their
    sessions, waiting until each is gone, so that none of their transactions commits later.

    PostgreSQL lets a role end only the sessions of roles whose privileges it has (or holders of
    ``pg_signal_backend``). The admin role created the tenant's roles and holds them WITH ADMIN
    OPTION, so it first makes itself a member that inherits them (PostgreSQL 16+: ``WITH INHERIT
    TRUE, SET FALSE``; 15: a plain grant, inherited by an ``INHERIT`` admin role). The membership
    goes with the roles when they are dropped.
    """
    present = [r for r in roles if role_exists(conn, r)]
    if not present:
        return
    admin = conn.execute(text("select current_user")).scalar_one()
    option = " WITH INHERIT TRUE, SET FALSE" if (conn.dialect.server_version_info or (0,)) >= (16,) else ""
    try:
        for role in present:
            conn.exec_driver_sql(f"ALTER ROLE {quote_ident(role)} NOLOGIN")
            conn.exec_driver_sql(f"GRANT {quote_ident(role)} TO {quote_ident(admin)}{option}")
        pids = (
            conn.execute(
                text(
                    "select pid from pg_stat_activity where usename = any(:roles) and pid <> pg_backend_pid()"
                ),
                {"roles": present},
            )
            .scalars()
            .all()
        )
        # one call per pid (a qualifier beside it could be evaluated after it); with a timeout,
        # pg_terminate_backend waits until the session has exited (false: it did not in time)
        # (false, too, for a session that exited meanwhile: hence the look at what is left)
        for pid in pids:
            conn.execute(text("select pg_terminate_backend(:pid, 10000)"), {"pid": pid})
        lingering = (
            conn.execute(
                text("select pid from pg_stat_activity where pid = any(:pids)"), {"pids": list(pids)}
            )
            .scalars()
            .all()
        )
    except exc.DBAPIError as error:
        raise DeletionError(
            f"Tenant {tenant.slug!r} is refused everywhere, but the sessions of its roles "
            f"{', '.join(present)} on server {server!r} could not be ended ({error.orig}); none of "
            "its data was removed. The admin role needs to inherit the tenant's roles (it must be "
            "INHERIT on PostgreSQL 15) or to hold pg_signal_backend; then rerun "
            f"delete_tenant({tenant.slug!r})."
        ) from error
    if lingering:
        raise DeletionError(
            f"Tenant {tenant.slug!r} is refused everywhere, but the sessions {sorted(lingering)} of "
            f"its roles on server {server!r} did not exit within 10 s; none of its data was "
            f"removed. Rerun delete_tenant({tenant.slug!r})."
        )


def _role_entry(server: str, role: str) -> dict[str, str]:
    return {"kind": "role", "server": server, "name": role}


def _database_entry(names: Names) -> dict[str, str]:
    return {"kind": "database", "server": names.server, "name": names.database, "temporary": names.temporary}


def _journal(admin: Engine, tenant: Tenant, *entries: dict[str, str]) -> None:
    """Record ``entries`` in the journal of ``tenant``'s registry row, committed before they are
    created: the clean-up drops nothing the journal does not name."""
    with admin.begin() as conn:
        if not TenantStore().journal(conn, tenant.id, _JOURNAL, entries):
            raise ProvisioningError(
                f"The registry row of tenant {tenant.slug!r} changed while it was being provisioned "
                "(deleted by another process?); its provisioning was stopped and undone."
            )


def _restrict(conn: Connection, databases: list[str], *, grant: tuple[str, str | None]) -> None:
    """As a superuser: take ``CONNECT`` and ``TEMPORARY`` on ``databases`` from ``PUBLIC``; give
    ``CONNECT`` back to the server's admin role on the database its URL names (``grant``), the
    one it connects to."""
    admin_role, admin_database = grant
    present = conn.execute(
        text("select datname from pg_database where datname = any(:d) and datallowconn order by 1"),
        {"d": databases},
    ).scalars()
    for database in present:
        db = quote_ident(database)
        conn.exec_driver_sql(f"REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC")
        if database == admin_database:
            conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {db} TO {quote_ident(admin_role)}")
        log.info("closed database %s to PUBLIC (CONNECT and TEMPORARY)", database)


def _warn_open(conn: Connection, tenant: Tenant, role: str, what: str, server: str, *, own: str) -> None:
    """Log a warning when ``role`` may connect to databases of ``conn``'s server besides ``own``."""
    open_databases = databases_open_to(conn, role, besides=[own])
    if not open_databases:
        return
    isolation_log.warning(
        "Database tenant %s: its %s %s can connect to %s on server %r besides %s, although it "
        "needs no other database (CREATE DATABASE lets PUBLIC connect to every new database). As a "
        "superuser or the databases' owner, run: %s; then GRANT CONNECT to the roles that do use "
        "them. prepare_server() does this for the maintenance databases unless "
        "restrict_maintenance_databases=False, install() for the main database.",
        tenant.slug,
        what,
        quote_ident(role),
        ", ".join(d.name for d in open_databases),
        server,
        own,
        "; ".join(d.fix(role) for d in open_databases),
    )


def _create_role(
    conn: Connection, role: str, password: str, config: TenancyConfig, *, inherit: bool = False
) -> None:
    refuse_existing_role(conn, role)
    # Only a SCRAM verifier goes over the wire (and into any server log), never the password.
    verifier = scram_verifier(password, iterations=config.tenant_scram_iterations)
    run_script(
        conn,
        f"CREATE ROLE {quote_ident(role)} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
        f"{'INHERIT' if inherit else 'NOINHERIT'} PASSWORD {quote_literal(verifier)}",
    )


def _set_password(conn: Connection, role: str, password: str, config: TenancyConfig) -> None:
    """A new SCRAM verifier of ``password`` for ``role``, with the configured iteration count."""
    verifier = scram_verifier(password, iterations=config.tenant_scram_iterations)
    conn.exec_driver_sql(f"ALTER ROLE {quote_ident(role)} PASSWORD {quote_literal(verifier)}")
