"""Schema placement: each tenant has a schema of its own in the main database, and a NOLOGIN role
that may use that schema and the infrastructure schemas, nothing else.

Each transaction binds, transaction-locally, ``search_path`` to the tenant's schema only (no
``public`` fallback: a table missing there is an error, never somebody else's table), the role to
the tenant's role (so schema privileges are a second line of defence under routing), and
``app.current_tenant_id`` (so RLS on infrastructure tables applies as for shared tenants). An
anonymous scope binds the tenant's anonymous role ``<prefix>_<slug>_anon`` instead, which may read
the opted-in tables of that schema only (see :mod:`sqla_tenancy.anonymous`).

Provisioning runs the DDL of the tenant tables directly, from a template compiled once per
process: no migration replay and no catalog scan (the tables are granted through default
privileges set up before they exist), so its cost stays flat as the fleet grows.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, create_mock_engine, text
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg
from sqlalchemy.engine import URL, Engine
from sqlalchemy.schema import CreateIndex, CreateSequence

from ..anonymous import (
    anonymous_gate,
    anonymous_group,
    existing_role_error,
    refuse_anonymous_without_login,
    role_exists,
    schema_tenant_ddl,
    table_access_ddl,
    tenant_anonymous_role,
)
from ..binding import binding_statement, distributed_binding_statement, migration_binding_statement
from ..errors import ConfigurationError, ProvisioningError, UnsupportedOperation
from ..grants import (
    calling_keeper,
    keeper_call,
    keeper_drops,
    keeper_for_new_roles,
    keepers_apply,
    tenants_group,
)
from ..identifiers import quote_ident, quote_literal, role_name, schema_name
from ..passwords import derive_password, scram_verifier
from ..registry import REGISTRY_SCHEMA
from ..rls import TENANT_ID_INFO_KEY, enable_rls_ddl, is_tenant_scoped
from ..versions import TENANT, VERSION_TABLES
from .base import MigrationSite, PlacementBase, run_script
from .shared import delete_tenant_rows, main_tenant_revision

if TYPE_CHECKING:
    from ..config import TenancyConfig
    from ..engines import Engines
    from ..registry import Tenant
    from ..steps import Steps

__all__ = ["SchemaPlacement", "tenant_ddl_template"]

#: Citus: the tenant's schema becomes a distributed schema (schema-based sharding), created on the
#: workers at once (not when the provisioning transaction commits: the tables, grants and default
#: privileges that follow need it there), with the statements after it run one node at a time, as
#: Citus needs in a transaction that created what they touch.
_CITUS_SCHEMA_SETTINGS = [
    "SET LOCAL citus.create_object_propagation = 'immediate'",
    "SET LOCAL citus.multi_shard_modify_mode = 'sequential'",
    "SET LOCAL citus.enable_schema_based_sharding = on",
]


def tenant_ddl_template(config: TenancyConfig) -> str:
    """The DDL creating every tenant table (types, sequences, indexes, RLS included), unqualified,
    as one multi-statement script: run it with ``search_path`` set to the tenant's schema."""
    tables = config.tenant_tables()
    qualified = sorted(t.fullname for t in tables if t.schema is not None)
    if qualified:
        raise ProvisioningError(
            f"Schema tenants need their tables unqualified (schema=None), but {', '.join(qualified)} "
            "name a schema: move them to an infrastructure schema or drop the explicit schema."
        )
    statements: list[str] = []
    dialect = postgresql_psycopg.dialect()  # type: ignore[no-untyped-call]

    def collect(sql: Any, *args: Any, **kwargs: Any) -> None:
        # An index on tenant_id alone is useless where every row has the same tenant (and each
        # index is one more file to create per tenant).
        if isinstance(sql, CreateIndex) and all(c.info.get(TENANT_ID_INFO_KEY) for c in sql.element.columns):
            return
        compiled = str(sql.compile(dialect=dialect)).strip()
        if config.distributed:
            compiled = _citus_compatible(sql, compiled)
        statements.append(compiled)

    mock = create_mock_engine("postgresql+psycopg://", collect)
    config.metadata.create_all(mock, tables=tables, checkfirst=False)
    # tenant_id stays meaningful in every placement: RLS on the tenant-scoped tables here too.
    for table in tables:
        if is_tenant_scoped(table):
            statements += [
                stmt
                for stmt in enable_rls_ddl(table, function_schema=REGISTRY_SCHEMA)
                if not stmt.startswith("DROP POLICY")
            ]
    return ";\n".join(statements)


#: ``SERIAL``-family column types and the identity column that replaces each on Citus
_SERIALS = re.compile(r"^(\t.+? )(SMALLSERIAL|BIGSERIAL|SERIAL)\b", re.MULTILINE)
_IDENTITY = {"SMALLSERIAL": "SMALLINT", "SERIAL": "INTEGER", "BIGSERIAL": "BIGINT"}


def _citus_compatible(ddl: Any, compiled: str) -> str:
    """A tenant table's DDL as a distributed schema's provisioning can run it on Citus.

    Citus creates a sequence's metadata on the workers over a superuser connection of its own,
    which cannot see a schema the (non-superuser) admin role created in the same, uncommitted,
    transaction: ``SERIAL`` columns there fail with ``schema ... does not exist``. Identity
    columns carry their sequence inside the table's DDL and work: a ``SERIAL`` column becomes
    ``... GENERATED BY DEFAULT AS IDENTITY`` (same values, same ``<table>_<column>_seq``
    sequence, explicit values still accepted). A stand-alone sequence is refused."""
    if isinstance(ddl, CreateSequence):
        raise ConfigurationError(
            f"distributed=True: the tenant tables' sequence {ddl.element.name!r} cannot be created in a "
            "schema tenant's distributed schema on Citus (Citus creates sequences over a connection "
            "of its own, which does not see the new schema). Use an autoincrementing integer "
            "primary key or an Identity() column instead of a Sequence()."
        )
    return _SERIALS.sub(
        lambda m: f"{m.group(1)}{_IDENTITY[m.group(2)]} GENERATED BY DEFAULT AS IDENTITY", compiled
    )


def refuse_models_off_head(
    config: TenancyConfig, admin: Connection, heads: tuple[str, ...], slug: str
) -> None:
    """A schema tenant is built from the models and stamped at the tenant stream's head: refuse
    when the two differ, since the tenant would be stamped at a head it does not match and the
    next migration would fail for it (``DuplicateColumn``). The main database's tenant tables are
    the reference: they are at head when its tenant-stream revision is."""
    from ..versions import format_revision

    head = format_revision(heads)
    main = main_tenant_revision(admin)
    if main != head:
        raise ProvisioningError(
            f"Cannot create schema tenant {slug!r}: the main database's tenant tables are at "
            f"revision {main or 'base'}, the tenant stream's head is {head}. Run `alembic upgrade "
            "head` (or `sqla-tenancy migrate`) first."
        )
    tables = {t.name: {c.name for c in t.columns} for t in config.tenant_tables()}
    rows = admin.exec_driver_sql(
        "select c.relname, a.attname from pg_attribute a join pg_class c on c.oid = a.attrelid "
        "where c.relnamespace = current_schema()::regnamespace and c.relkind in ('r', 'p') "
        "and c.relname = any(%(names)s) and a.attnum > 0 and not a.attisdropped",
        {"names": list(tables)},
    ).all()
    found: dict[str, set[str]] = {}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    drift = []
    for table, columns in sorted(tables.items()):
        if table not in found:
            drift.append(f"table {table} is in the models only")
            continue
        if extra := sorted(columns - found[table]):
            drift.append(f"{table}: {', '.join(extra)} in the models only")
        if missing := sorted(found[table] - columns):
            drift.append(f"{table}: {', '.join(missing)} in the migrations only")
    if drift:
        raise ProvisioningError(
            f"Cannot create schema tenant {slug!r}: the models differ from the tenant stream's "
            f"head {head} ({'; '.join(drift)}), so the tenant would be stamped at a revision it "
            "does not match. Run `alembic revision --autogenerate -m ...` and `alembic upgrade "
            "head` first (or undo the model change)."
        )


class SchemaPlacement(PlacementBase):
    """A schema and a role per tenant, in the main database."""

    name = "schema"
    transactional = True
    admitted = True
    per_tenant_engines = False

    def __init__(self, config: TenancyConfig, engines: Engines, steps: Steps) -> None:
        super().__init__(config, engines, steps)
        self._ddl: str | None = None
        self._lock = threading.Lock()

    def _template(self) -> str:
        """The tenant tables' DDL, compiled once (the MetaData is the configuration's)."""
        with self._lock:
            if self._ddl is None:
                self._ddl = tenant_ddl_template(self.config)
            return self._ddl

    def names(self, slug: str) -> tuple[str, str]:
        """The tenant's schema and role."""
        return schema_name(slug, self.config.name_prefix), role_name(slug, "app", self.config.name_prefix)

    def derived_names(self, tenant: Tenant) -> dict[tuple[str, str], str]:
        """What provisioning ``tenant`` would create, as ``{(kind, name): what it is}``, for the
        check against the library's own names."""
        schema, role = self.names(tenant.slug)
        return {
            ("schema", schema): "schema",
            ("role", role): "role",
            ("role", tenant_anonymous_role(self.config, tenant.slug)): "anonymous role",
        }

    def initial_location(self, server: str | None) -> dict[str, Any]:
        if server is not None:
            raise ProvisioningError("server= applies to placement='database' only.")
        return {}

    def provision(self, tenant: Tenant, *, admin: Connection | None) -> dict[str, Any]:
        assert admin is not None
        schema, role = self.names(tenant.slug)
        anonymous = tenant_anonymous_role(self.config, tenant.slug)
        s, r, anon = quote_ident(schema), quote_ident(role), quote_ident(anonymous)
        # one round trip for both checks: the schema, and the roles, must not exist yet
        schema_found, roles_found = admin.exec_driver_sql(
            "select exists (select from pg_namespace where nspname = %(s)s), "
            "array(select rolname::text from pg_roles where rolname = any(%(r)s))",
            {"s": schema, "r": [role, anonymous]},
        ).one()
        if schema_found:
            raise ProvisioningError(
                f"The schema {schema!r} exists already, and tenant {tenant.slug!r} did not create "
                "it; sqla-tenancy neither adopts nor drops it. Drop or rename it if it is a "
                "leftover, or give Tenancy a distinct name_prefix."
            )
        for name in (role, anonymous):
            if name in roles_found:
                raise existing_role_error(name)
        heads = self.config.tenant_heads()
        if heads is not None:
            refuse_models_off_head(self.config, admin, heads, tenant.slug)
        self.steps("schema")
        app_role = self.config.app_role
        assert app_role
        tenants, anonymous_infra = tenants_group(self.config), anonymous_group(self.config)
        gate = anonymous_gate(self.config)
        if keepers_apply(admin) and not self.config.distributed:
            # PostgreSQL 16+: the roles are created and granted by a keeper, whose membership graph
            # stays small (see sqla_tenancy.grants): no statement here walks the fleet's roles.
            # (Not on Citus, where the roles log in: see _login.)
            keeper, keeper_ddl = keeper_for_new_roles(admin, self.config)
            calling_keeper(admin, keeper)
            roles = [
                keeper_call(keeper, "create", role, tenants),
                keeper_call(keeper, "create", anonymous, anonymous_infra),
            ]
            group_grants: list[str] = []
            memberships = [
                keeper_call(keeper, "grant", role, app_role),
                keeper_call(keeper, "grant", anonymous, gate),
            ]
        else:
            keeper_ddl = []
            options = "NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE INHERIT"
            roles = [
                f"CREATE ROLE {r} {self._login(role)} {options}",
                # anonymous requests' role: reads opted-in tables only (sqla_tenancy.anonymous)
                f"CREATE ROLE {anon} {self._login(anonymous, anonymous=True)} {options}",
            ]
            group_grants = [
                f"GRANT {quote_ident(tenants)} TO {r}",
                f"GRANT {quote_ident(anonymous_infra)} TO {anon}",
            ]
            # PostgreSQL 16+ (Citus): membership only for SET ROLE, without the tenant's privileges
            inherit = " WITH INHERIT FALSE" if (admin.dialect.server_version_info or (0,)) >= (16,) else ""
            memberships = [
                f"GRANT {r} TO {quote_ident(app_role)}{inherit}",
                f"GRANT {anon} TO {quote_ident(gate)}",
            ]
        # The role and its default privileges come before the tables, so that the tables are
        # granted as they are created: a GRANT ... ON ALL TABLES IN SCHEMA would scan pg_class,
        # whose size grows with the fleet.
        distributed = self.config.distributed
        self._script(
            admin,
            ";\n".join(
                [
                    *keeper_ddl,
                    # Citus: a distributed schema (schema-based sharding), placed on one node
                    *(_CITUS_SCHEMA_SETTINGS if distributed else []),
                    f"CREATE SCHEMA {s}",
                    *(["SET LOCAL citus.enable_schema_based_sharding = off"] if distributed else []),
                    *roles,
                    f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} "
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}",
                    f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE, SELECT ON SEQUENCES TO {r}",
                ]
            ),
        )
        self.steps("tables")
        template = self._template()
        if template:
            # Unqualified names land in the first schema of the path; public stays reachable for
            # extension types during DDL only.
            script = f"SET LOCAL search_path = {s}, public;\n{template};\nSET LOCAL search_path = DEFAULT"
            self._script(admin, script)
        revision: dict[str, Any] = {}
        if heads is not None:
            # Born at the tenant stream's head: the fleet runner has nothing to replay here.
            from ..versions import format_revision, version_table_script

            version_table = f"{s}.{quote_ident(VERSION_TABLES[TENANT])}"
            self._script(
                admin,
                f"{version_table_script(schema, TENANT, heads)};\nREVOKE ALL ON {version_table} FROM {r}",
            )
            revision["_revision"] = format_revision(heads)
        self.steps("role")
        # its own schema, and the infrastructure through the group every tenant role belongs to
        self._script(
            admin,
            ";\n".join(
                [
                    f"GRANT USAGE ON SCHEMA {s} TO {r}",
                    *group_grants,
                    *schema_tenant_ddl(self.config, schema, anonymous, group=False),
                ]
            ),
        )
        self.steps("membership")
        # PostgreSQL 16+: membership only for SET ROLE, without inheriting the tenant's privileges.
        self._script(admin, ";\n".join(memberships))
        return {"schema": schema, "role": role, **revision}

    def _script(self, admin: Connection, script: str) -> None:
        """Run a provisioning script (statements joined by ``";\\n"``) in ``admin``'s transaction:
        in one round trip, or on Citus statement by statement (Citus forwards some utility
        statements to the workers as the query string they came in, which must then hold one)."""
        if not self.config.distributed:
            run_script(admin, script)
            return
        assert "$$" not in script, "a dollar-quoted body may hold the separator"
        for statement in script.split(";\n"):
            if statement.strip():
                admin.exec_driver_sql(statement)

    def _login(self, role: str, *, anonymous: bool = False) -> str:
        """``NOLOGIN``: the application role's transactions ``SET ROLE`` to it. On Citus the
        coordinator opens its connections to the node holding the tenant's schema as the current
        role, so there the role logs in, with a password derived from the secret key (see
        :meth:`node_logins`); the anonymous role only when a secret key is configured (without
        one, anonymous requests are refused on Citus)."""
        if not self.config.distributed or (anonymous and not self.config.has_secret()):
            return "NOLOGIN"
        verifier = scram_verifier(
            derive_password(self.config.secret(), role), iterations=self.config.tenant_scram_iterations
        )
        return f"LOGIN PASSWORD {quote_literal(verifier)}"

    def node_logins(self, tenant: Tenant) -> list[tuple[str, str]]:
        """On Citus (``distributed=True``): the roles the coordinator's connections to the node
        holding ``tenant``'s schema log in as, with their passwords: the tenant's role and its
        anonymous role. See :meth:`Tenancy.node_logins <sqla_tenancy.Tenancy.node_logins>`."""
        if not self.config.distributed:
            raise UnsupportedOperation("node_logins() applies to a distributed (Citus) Tenancy only.")
        roles = [self.names(tenant.slug)[1], tenant_anonymous_role(self.config, tenant.slug)]
        return [(role, derive_password(self.config.secret(), role)) for role in roles]

    def deprovision(
        self, tenant: Tenant, *, admin: Connection | None, keep_infrastructure_rows: bool
    ) -> None:
        assert admin is not None
        schema, role = self.names(tenant.slug)
        s = quote_ident(schema)
        if not keep_infrastructure_rows:
            delete_tenant_rows(tenant, reversed(self.config.infrastructure_tables()), admin=admin)
        statements = [f"DROP SCHEMA IF EXISTS {s} CASCADE"]
        for name in (role, tenant_anonymous_role(self.config, tenant.slug)):
            # by the keeper that created it: as the admin role, DROP ROLE walks the admin's
            # memberships, and through the keepers every schema tenant's roles
            keeper = keeper_drops(admin, self.config, name)
            if keeper:
                calling_keeper(admin, keeper)
            statements.append(
                keeper_call(keeper, "drop", name) if keeper else f"DROP ROLE IF EXISTS {quote_ident(name)}"
            )
        self._script(admin, ";\n".join(statements))

    def compensate(self, tenant: Tenant) -> None:
        """Nothing to do: provisioning is transactional."""

    def migration_site(self, tenant: Tenant) -> MigrationSite | None:
        return MigrationSite("schema", schema=self.names(tenant.slug)[0])

    def migration_binding(self, tenant: Tenant) -> str:
        return migration_binding_statement(tenant.id, schema=self.names(tenant.slug)[0])

    def after_migration(self, conn: Connection, tenant: Tenant, *, created: bool) -> None:
        schema, role = self.names(tenant.slug)
        if created:
            # the tenant's role gets every table of its schema by default privileges: not this one
            table = f"{quote_ident(schema)}.{quote_ident(VERSION_TABLES[TENANT])}"
            conn.exec_driver_sql(f"REVOKE ALL ON {table} FROM {quote_ident(role)}")
        anonymous = tenant_anonymous_role(self.config, tenant.slug)
        if not role_exists(conn, anonymous):  # tenants created before anonymous roles existed
            return
        # what the anonymous role may read, per the models' current opt-ins
        present = set(
            conn.execute(
                text("select tablename from pg_tables where schemaname = :s"), {"s": schema}
            ).scalars()
        )
        tables = [t for t in self.config.tenant_tables() if t.schema is None and t.name in present]
        for statement in table_access_ddl(tables, anonymous, schema=schema):
            conn.exec_driver_sql(statement)

    def dump_target(self, tenant: Tenant) -> tuple[URL, str] | None:
        return self.config.admin_url, self.names(tenant.slug)[0]

    def binding(self, tenant: Tenant) -> bytes:
        return self._binding(tenant, self.names(tenant.slug)[1])

    def anonymous_binding(self, tenant: Tenant) -> bytes:
        refuse_anonymous_without_login(self.config)
        return self._binding(tenant, tenant_anonymous_role(self.config, tenant.slug))

    def _binding(self, tenant: Tenant, role: str) -> bytes:
        schema = self.names(tenant.slug)[0]
        if self.config.distributed:
            return distributed_binding_statement(tenant.id, schema=schema, role=role)
        return binding_statement(tenant.id, schema=schema, role=role)

    def engine(self, tenant: Tenant, *, async_: bool) -> Engine:
        return self.engines.main(async_)
