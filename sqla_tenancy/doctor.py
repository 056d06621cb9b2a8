"""The isolation doctor: the live databases audited against the isolation model.

Every check reads PostgreSQL's catalogs (as the admin role), not the models: what the doctor
reports is what the database enforces now, whoever changed it since :meth:`Tenancy.install`
(a hand-written migration, a DBA's ``ALTER``, an extension's ``CREATE FUNCTION``). Each
:class:`Finding` names the object, what is wrong, how bad it is, and the SQL or call that fixes
it. ``error`` findings break the isolation promise (a tenant can read or change another's rows,
or escape its role); ``warning`` findings are drift that breaks a tenant's queries or leaves
litter behind, without crossing tenants.

The doctor changes nothing. Its cost is a handful of catalog queries in the main database, and
a connection to each database tenant's database.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from . import locks
from .config import plain_url
from .grants import is_keeper_role
from .identifiers import quote_ident
from .installer import outdated_admission
from .keys import ACROSS_TENANTS_INFO_KEY
from .lifecycle import library_names
from .placements.database import FOREIGN_SERVER, databases_open_to, template_database
from .registry import MOVE_GUARD_PREFIX, MOVE_JOURNAL_KEY, REGISTRY_SCHEMA, Tenant
from .rls import fdw_role_name, tenant_column_name
from .versions import TENANT, VERSION_TABLES, format_revision

if TYPE_CHECKING:
    from .services import Services

__all__ = ["Finding", "Severity", "doctor", "findings_json"]

log = logging.getLogger("sqla_tenancy.doctor")

Severity = Literal["error", "warning"]

#: PostgreSQL's ``polcmd`` letters, by command
_COMMANDS = {"SELECT": "r", "INSERT": "a", "UPDATE": "w", "DELETE": "d"}
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")
#: the statuses of tenants whose objects exist and are audited (pending: the pool's)
_LIVE = ("active", "suspended", "pending")
#: the citus extension's own schemas (its tables are not the application's)
_CITUS_SCHEMAS = ("citus", "citus_internal", "columnar", "columnar_internal")


@dataclass(frozen=True)
class Finding:
    """One thing the doctor found wrong."""

    #: ``"error"``: isolation is broken or can be broken; ``"warning"``: drift without a leak
    severity: Severity
    #: a stable identifier of the check (``"rls-not-forced"``), for filtering and alerts
    check: str
    #: the object concerned (``table public.projects``, ``role app``, ``tenant acme``)
    object: str
    #: what is wrong, and what it lets happen
    problem: str
    #: the SQL (or Python call) that fixes it
    fix: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.object}: {self.problem} Fix: {self.fix}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def findings_json(findings: Sequence[Finding]) -> str:
    """The findings as a JSON array of objects (what ``sqla-tenancy doctor --json`` prints)."""
    return json.dumps([f.as_dict() for f in findings], indent=2)


def doctor(services: Services) -> list[Finding]:
    """Audit every location of ``services``' Tenancy; errors first."""
    run = _Doctor(services)
    run.run()
    return sorted(run.findings, key=lambda f: (f.severity != "error", f.check, f.object))


class _Doctor:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config
        self.findings: list[Finding] = []
        self.prefix = self.config.name_prefix
        #: (kind, name) of the registry's objects found missing
        self.missing: set[tuple[str, str]] = set()
        #: the tenants reported for an interrupted move (once each)
        self.moves_reported: set[object] = set()

    def add(self, severity: Severity, check: str, obj: str, problem: str, fix: str) -> None:
        self.findings.append(Finding(severity, check, obj, problem, fix))

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> None:
        with self.services.engines.admin.connect() as conn:
            tenants = self.services.store.list(conn)
            schema_tenants = [t for t in tenants if t.strategy == "schema"]
            tenant_schemas = sorted(str(t.location.get("schema", "")) for t in schema_tenants)
            schemas = self._application_schemas(conn, tenant_schemas)
            self._app_role(conn)
            # the registry's own tables (the audit trail has a tenant_id) are not tenant tables
            tables = self._tenant_tables(conn, [s for s in schemas if s != REGISTRY_SCHEMA])
            self._rls(conn, tables, where="the main database")
            self._views(conn, tables, schemas, where="the main database")
            self._keys(
                conn, {oid: name for oid, name in tables.items() if name.split(".")[0] not in tenant_schemas}
            )
            self._functions(conn, schemas, where="the main database")
            if self.config.distributed:
                self._citus(conn, [s for s in schemas if s not in (REGISTRY_SCHEMA, *tenant_schemas)])
            self._main_database(conn)
            self._registry(conn, tenants)
            self._moves(conn, tenants)
            self._migrations(tenants)
            self._pool(tenants)
            main_database = self.config.admin_url.database or ""
            for tenant in tenants:
                if tenant.strategy == "database" and tenant.status in _LIVE:
                    self._fdw_role(conn, tenant, main_database)
            conn.rollback()
        for tenant in tenants:
            if tenant.strategy == "database" and tenant.status in _LIVE:
                self._database_tenant(tenant)

    @contextmanager
    def _on(self, server: str, database: str) -> Iterator[Connection]:
        url = plain_url(self.config.server_admin_url(server)).set(database=database)
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                yield conn
                conn.rollback()
        finally:
            engine.dispose()

    # -- what the application role may do -------------------------------------------------------

    def _application_schemas(self, conn: Connection, tenant_schemas: list[str]) -> list[str]:
        """The schemas holding tenant or infrastructure objects: every schema but PostgreSQL's
        own and the registry's (what is not the application's is not looked at)."""
        return list(
            conn.execute(
                text(
                    "select nspname from pg_namespace where nspname <> all(:system) "
                    "and nspname not like 'pg\\_temp\\_%' and nspname not like 'pg\\_toast\\_temp\\_%' "
                    "order by 1"
                ),
                {"system": list(_SYSTEM_SCHEMAS)},
            ).scalars()
        )

    def _app_role(self, conn: Connection) -> None:
        role = self.config.app_role
        if not role:
            return
        row = conn.execute(
            text("select rolsuper, rolbypassrls from pg_roles where rolname = :r"), {"r": role}
        ).first()
        if row is None:
            self.add(
                "error",
                "app-role-missing",
                f"role {role}",
                "The application role does not exist.",
                f"CREATE ROLE {quote_ident(role)} LOGIN NOSUPERUSER NOBYPASSRLS, then tenancy.install()",
            )
            return
        r = quote_ident(role)
        severity: Severity = "warning" if self.config.allow_bypassrls else "error"
        if row.rolsuper:
            self.add(
                severity,
                "app-role-superuser",
                f"role {role}",
                "The application role is a superuser: row-level security never applies to it, "
                "so every tenant can read every other tenant's rows.",
                f"ALTER ROLE {r} NOSUPERUSER",
            )
        if row.rolbypassrls:
            self.add(
                severity,
                "app-role-bypassrls",
                f"role {role}",
                "The application role has BYPASSRLS: the tenant policies do not apply to it.",
                f"ALTER ROLE {r} NOBYPASSRLS",
            )
        owned = conn.execute(
            text(
                "select c.oid::regclass::text from pg_class c join pg_roles o on o.oid = c.relowner "
                "where o.rolname = :r and c.relkind in ('r', 'p') "
                "and exists (select from pg_attribute a where a.attrelid = c.oid "
                "and a.attname = any(:cols) and not a.attisdropped) order by 1"
            ),
            {"r": role, "cols": self._tenant_columns()},
        ).scalars()
        admin = quote_ident(self.config.admin_url.username or "<admin role>")
        for table in owned:
            self.add(
                "error",
                "app-role-owns-table",
                f"table {table}",
                "The application role owns this tenant table: an owner can disable or drop "
                "its row-level security (ALTER TABLE ... NO FORCE ROW LEVEL SECURITY).",
                f"ALTER TABLE {table} OWNER TO {admin}",
            )
        powerful = conn.execute(
            text(
                "select g.rolname, g.rolsuper, g.rolbypassrls from pg_roles g "
                "where g.rolname <> :r and pg_has_role(:r, g.oid, 'MEMBER') and (g.rolsuper "
                "or g.rolbypassrls or exists (select from pg_class c where c.relowner = g.oid "
                "and c.relkind in ('r', 'p') and exists (select from pg_attribute a "
                "where a.attrelid = c.oid and a.attname = any(:cols) and not a.attisdropped))) "
                "order by 1"
            ),
            {"r": role, "cols": self._tenant_columns()},
        ).all()
        for group, superuser, bypass in powerful:
            what = "is a superuser" if superuser else "has BYPASSRLS" if bypass else "owns tenant tables"
            self.add(
                severity if (superuser or bypass) else "error",
                "app-role-member",
                f"role {role}",
                f"The application role is a member of {group!r}, which {what}: SET ROLE "
                f"{quote_ident(group)} (or inheritance) gives every tenant's rows away.",
                f"REVOKE {quote_ident(group)} FROM {r}",
            )

    def _tenant_columns(self) -> list[str]:
        names = {tenant_column_name(t) for t in self.config.metadata.tables.values()}
        return sorted({"tenant_id", *(n for n in names if n)})

    # -- tables, policies, views, keys, functions --------------------------------------------------

    def _tenant_tables(self, conn: Connection, schemas: Sequence[str]) -> dict[int, str]:
        """Tables with a tenant column in ``schemas``: ``{oid: qualified name}``."""
        rows = conn.execute(
            text(
                "select c.oid, c.oid::regclass::text from pg_class c "
                "join pg_namespace n on n.oid = c.relnamespace "
                "where c.relkind in ('r', 'p') and n.nspname = any(:schemas) "
                "and exists (select from pg_attribute a where a.attrelid = c.oid "
                "and a.attname = any(:cols) and not a.attisdropped) order by 2"
            ),
            {"schemas": list(schemas), "cols": self._tenant_columns()},
        ).all()
        return {int(oid): str(name) for oid, name in rows}

    def _rls(self, conn: Connection, tables: dict[int, str], *, where: str) -> None:
        if not tables:
            return
        rows = conn.execute(
            text(
                "select c.oid, c.relrowsecurity, c.relforcerowsecurity from pg_class c "
                "where c.oid = any(:oids)"
            ),
            {"oids": list(tables)},
        ).all()
        for oid, enabled, forced in rows:
            name = tables[int(oid)]
            if not enabled:
                self.add(
                    "error",
                    "rls-disabled",
                    f"table {name} in {where}",
                    "Row-level security is not enabled: every role that may read the table "
                    "reads every tenant's rows.",
                    f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
                )
            if not forced:
                self.add(
                    "error",
                    "rls-not-forced",
                    f"table {name} in {where}",
                    "Row-level security is not forced: the table's owner (the role that runs "
                    "migrations) is not subject to the tenant policies.",
                    f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
                )
        policies = conn.execute(
            text(
                "select p.polrelid, p.polname, p.polcmd, p.polpermissive, "
                "pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid) "
                "from pg_policy p where p.polrelid = any(:oids) order by 1, 2"
            ),
            {"oids": list(tables)},
        ).all()
        covered: dict[int, set[str]] = {oid: set() for oid in tables}
        for relid, policy, command, permissive, qual, check in policies:
            name = tables[int(relid)]
            if not permissive:
                continue  # restrictive policies only narrow what the permissive ones allow
            covered[int(relid)].update(_COMMANDS.values() if command == "*" else {command})
            unchecked = [e for e in (qual, check) if e is not None and "current_tenant_id()" not in e]
            if unchecked:
                self.add(
                    "error",
                    "policy-without-tenant",
                    f"policy {policy} on {name} in {where}",
                    f"This permissive policy does not compare the tenant ({unchecked[0]}): "
                    "permissive policies are OR-ed, so it lets every tenant through.",
                    f"DROP POLICY {quote_ident(policy)} ON {name}; or make it RESTRICTIVE, "
                    f"or add AND tenant_id = {REGISTRY_SCHEMA}.current_tenant_id()",
                )
        for oid, commands in covered.items():
            missing = [c for c, letter in _COMMANDS.items() if letter not in commands]
            if missing:
                self.add(
                    "warning",
                    "policy-missing",
                    f"table {tables[oid]} in {where}",
                    f"No permissive policy for {', '.join(missing)}: those commands see no row "
                    "(fails closed, but the application breaks).",
                    "tenancy.install() (or the migration that creates the table) recreates the "
                    "four tenancy_* policies; see sqla_tenancy.rls.enable_rls_ddl",
                )

    def _views(self, conn: Connection, tables: dict[int, str], schemas: Sequence[str], *, where: str) -> None:
        if not tables:
            return
        rows = conn.execute(
            text(
                "select distinct v.oid::regclass::text, v.relkind, "
                "coalesce((select lower(option_value) in ('true', 'on', 'yes', '1') "
                "from pg_options_to_table(v.reloptions) where option_name = 'security_invoker'), false) "
                "from pg_class v join pg_namespace n on n.oid = v.relnamespace "
                "join pg_rewrite r on r.ev_class = v.oid "
                "join pg_depend d on d.classid = 'pg_rewrite'::regclass and d.objid = r.oid "
                "and d.refclassid = 'pg_class'::regclass "
                "where v.relkind in ('v', 'm') and n.nspname = any(:schemas) "
                "and d.refobjid = any(:oids) order by 1"
            ),
            {"schemas": list(schemas), "oids": list(tables)},
        ).all()
        for view, kind, invoker in rows:
            if kind == "m":
                self.add(
                    "error",
                    "materialized-view",
                    f"materialized view {view} in {where}",
                    "A materialized view over tenant tables stores every tenant's rows, "
                    "and row-level security does not apply to it.",
                    f"DROP MATERIALIZED VIEW {view}; keep such summaries per tenant, or "
                    "behind a security-invoker view that filters by tenant",
                )
            elif not invoker:
                self.add(
                    "error",
                    "view-not-security-invoker",
                    f"view {view} in {where}",
                    "This view reads tenant tables with its owner's rights, so the tenant "
                    "policies are checked against the owner, not the querying tenant.",
                    f"ALTER VIEW {view} SET (security_invoker = true)",
                )

    def _keys(self, conn: Connection, tables: dict[int, str]) -> None:
        """Keys of the tables tenants share (the main database's, outside schema tenants'
        schemas): PostgreSQL checks them across tenants, whatever RLS says."""
        if not tables:
            return
        allowed = {
            str(c.name)
            for t in self.config.metadata.tables.values()
            for c in t.constraints
            if c.name and c.info.get(ACROSS_TENANTS_INFO_KEY)
        }
        rows = conn.execute(
            text(
                "select k.conrelid::regclass::text, k.conname, k.contype, pg_get_constraintdef(k.oid) "
                "from pg_constraint k where k.conrelid = any(:oids) and k.contype in ('u', 'f') "
                "and not exists (select from pg_attribute a where a.attrelid = k.conrelid "
                "and a.attnum = any(k.conkey) and a.attname = any(:cols)) order by 1, 2"
            ),
            {"oids": list(tables), "cols": self._tenant_columns()},
        ).all()
        for table, name, kind, definition in rows:
            if kind == "u" and name in allowed:
                continue
            if kind == "f":
                problem = (
                    f"The foreign key {definition} does not include tenant_id: a row can "
                    "reference another tenant's row, and ON DELETE actions cross tenants."
                )
                fix = (
                    f"ALTER TABLE {table} DROP CONSTRAINT {quote_ident(name)}; re-create it as "
                    "FOREIGN KEY (tenant_id, ...) REFERENCES ...(tenant_id, ...) "
                    "(sqla_tenancy.tenant_foreign_key)"
                )
            else:
                problem = (
                    f"The unique constraint {definition} does not include tenant_id: a tenant "
                    "inserting a value another tenant holds learns that it exists."
                )
                fix = (
                    f"ALTER TABLE {table} DROP CONSTRAINT {quote_ident(name)}; ALTER TABLE {table} "
                    f"ADD CONSTRAINT {quote_ident(name)} UNIQUE (tenant_id, ...) "
                    "(sqla_tenancy.tenant_unique), or sqla_tenancy.unique_across_tenants on purpose"
                )
            self.add("error", "key-without-tenant", f"constraint {name} on {table}", problem, fix)

    def _functions(self, conn: Connection, schemas: Sequence[str], *, where: str) -> None:
        rows = conn.execute(
            text(
                "select p.oid::regprocedure::text, "
                "exists (select from unnest(coalesce(p.proconfig, '{}')) s where s like 'search_path=%'), "
                "exists (select from pg_depend d where d.classid = 'pg_policy'::regclass "
                "and d.refclassid = 'pg_proc'::regclass and d.refobjid = p.oid) "
                "from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
                "where p.prosecdef and n.nspname = any(:schemas) order by 1"
            ),
            {"schemas": [*schemas, REGISTRY_SCHEMA]},
        ).all()
        for function, pinned, in_policy in rows:
            if not pinned:
                self.add(
                    "error",
                    "definer-search-path",
                    f"function {function} in {where}",
                    "A SECURITY DEFINER function without a pinned search_path resolves names "
                    "where its caller says: a tenant can make it run its own objects with "
                    "the owner's rights.",
                    f"ALTER FUNCTION {function} SET search_path = pg_catalog, pg_temp",
                )
            if in_policy:
                self.add(
                    "error",
                    "definer-in-policy",
                    f"function {function} in {where}",
                    "A row-level security policy calls this SECURITY DEFINER function: it "
                    "reads with its owner's rights, past the policies of the tables it reads.",
                    f"ALTER FUNCTION {function} SECURITY INVOKER (and let it filter by tenant)",
                )

    # -- Citus (distributed=True) -----------------------------------------------------------------

    def _citus(self, conn: Connection, schemas: Sequence[str]) -> None:
        """What Citus makes of the main database's tables, and whether the application's
        connections carry the tenant to the workers."""
        if conn.execute(text("select 1 from pg_extension where extname = 'citus'")).first() is None:
            self.add(
                "error",
                "citus-missing",
                "database " + (self.config.admin_url.database or ""),
                "Tenancy(distributed=True), but the main database has no citus extension.",
                "CREATE EXTENSION citus (as a superuser, on a Citus coordinator), then tenancy.install()",
            )
            return
        schemas = [s for s in schemas if s not in _CITUS_SCHEMAS]
        rows = conn.execute(
            text(
                "select c.oid::regclass::text, "
                "exists (select from pg_attribute a where a.attrelid = c.oid and a.attname = any(:cols) "
                "and not a.attisdropped), p.partmethod, p.repmodel, p.colocationid, "
                "case when p.partmethod = 'h' then column_to_column_name(p.logicalrelid, p.partkey) end "
                "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                "left join pg_dist_partition p on p.logicalrelid = c.oid "
                "where c.relkind in ('r', 'p') and not c.relispartition and n.nspname = any(:schemas) "
                "order by 1"
            ),
            {"schemas": list(schemas), "cols": self._tenant_columns()},
        ).all()
        groups: dict[int, list[str]] = {}
        for table, tenant_scoped, method, replication, colocation, column in rows:
            if tenant_scoped:
                if method == "h" and column in self._tenant_columns():
                    groups.setdefault(int(colocation), []).append(str(table))
                    continue
                how = (
                    "is a table of the coordinator alone"
                    if method is None or (method == "n" and replication != "t")
                    else f"is distributed by {column}"
                    if method == "h"
                    else "is a reference table"
                )
                self.add(
                    "warning",
                    "citus-not-distributed",
                    f"table {table}",
                    f"This tenant table {how}, not distributed by tenant_id: every tenant's rows of it "
                    "stay on one node, and its joins and foreign keys with the other tenant tables "
                    "leave the tenant's node.",
                    f"SELECT create_distributed_table('{table}', 'tenant_id', colocate_with => "
                    "'<a tenant table>') (undistribute_table first if Citus has it otherwise); "
                    "migrations: op.distribute_tenant_table",
                )
            elif not (method == "n" and replication == "t"):
                self.add(
                    "warning",
                    "citus-not-reference",
                    f"table {table}",
                    "This table has no tenant column, and is not a reference table: joins of tenant "
                    "tables with it cannot run on the tenant's node, and the workers cannot check "
                    "foreign keys to it.",
                    f"SELECT create_reference_table('{table}'); migrations: op.make_reference_table",
                )
        if len(groups) > 1:
            largest = max(groups.values(), key=len)
            anchor = largest[0]
            for colocation, tables in sorted(groups.items()):
                if tables is largest:
                    continue
                for table in tables:
                    self.add(
                        "warning",
                        "citus-not-colocated",
                        f"table {table}",
                        f"This tenant table is distributed by tenant_id in colocation group "
                        f"{colocation}, apart from {anchor} and the others: a tenant's rows of it "
                        "may be on another node, so its joins and foreign keys cross nodes.",
                        f"SELECT update_distributed_table_colocation('{table}', colocate_with => '{anchor}')",
                    )
        self._citus_propagation()

    def _citus_propagation(self) -> None:
        """The application role's connections must send ``SET LOCAL`` on to the workers, where
        the policies run: a connection that does not (a pooler dropping the startup option, an
        engine built by hand) serves every tenant nothing."""
        raw = self.services.engines.app.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("select current_setting('citus.propagate_set_commands', true)")
            row = cursor.fetchone()
            setting = row[0] if row else None
            raw.rollback()
        finally:
            raw.close()
        if setting != "local":
            self.add(
                "warning",
                "citus-set-not-propagated",
                f"role {self.config.app_role}",
                f"The application's connections have citus.propagate_set_commands = {setting!r}: "
                "the tenant setting stays on the coordinator, and the workers' policies see no "
                "tenant (every tenant's queries return nothing; closed, not open).",
                "let the connection option -c citus.propagate_set_commands=local through (a "
                "pooler must not drop startup options), or ALTER ROLE "
                f"{quote_ident(self.config.app_role or '<application role>')} "
                "SET citus.propagate_set_commands = 'local'",
            )

    # -- databases, registry, roles ---------------------------------------------------------------

    def _main_database(self, conn: Connection) -> None:
        temporary, connect, name = conn.execute(
            text(
                "select has_database_privilege('public', current_database(), 'TEMPORARY'), "
                "has_database_privilege('public', current_database(), 'CONNECT'), current_database()"
            )
        ).one()
        db = quote_ident(name)
        if temporary:
            self.add(
                "error",
                "public-temporary",
                f"database {name}",
                "PUBLIC may create temporary tables in the main database: a temporary table "
                "left on a pooled connection can shadow the next tenant's tables.",
                f"REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC",
            )
        if connect:
            app = quote_ident(self.config.app_role or "<application role>")
            self.add(
                "error",
                "public-connect",
                f"database {name}",
                "PUBLIC may connect to the main database: every database tenant's login role can open it.",
                f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC; GRANT CONNECT ON DATABASE {db} TO {app}",
            )
        outdated = outdated_admission(conn)
        if outdated:
            self.add(
                "error",
                "admission-outdated",
                f"database {name}",
                f"The admission of shared and schema tenants ({', '.join(outdated)}) is missing or "
                "from another version of sqla-tenancy; earlier versions' could admit a transaction "
                "whose snapshot predated a deletion, suspension or move that committed meanwhile.",
                "tenancy.install() (idempotent) with the newest sqla-tenancy version in use",
            )

    def _registry(self, main: Connection, tenants: list[Tenant]) -> None:
        """Registry rows without their objects, and objects under the prefix without a row."""
        owned = library_names(self.config)
        expected: set[tuple[str, str]] = set(owned)
        servers = {"main"}
        for tenant in tenants:
            if tenant.status == "provisioning":
                self.add(
                    "warning",
                    "tenant-provisioning",
                    f"tenant {tenant.slug}",
                    "The tenant's provisioning did not finish (crashed, or still running).",
                    f"tenancy.create_tenant({tenant.slug!r}, placement={tenant.strategy!r}) "
                    "cleans up and retries; or tenancy.delete_tenant(...)",
                )
            elif tenant.status == "deleting":
                self.add(
                    "warning",
                    "tenant-deleting",
                    f"tenant {tenant.slug}",
                    "The tenant's deletion did not finish.",
                    f"tenancy.delete_tenant({tenant.slug!r}) again",
                )
            placement = self.services.placements.get(tenant.strategy)
            if placement is None:
                continue
            names = placement.derived_names(tenant)
            expected.update(names)
            server = str(tenant.location.get("server") or "main")
            servers.add(server)
            if tenant.status not in ("active", "suspended", "pending"):
                continue
            for (kind, name), what in sorted(names.items()):
                on = "main" if kind == "schema" or name.startswith(f"{self.prefix}_fdw_") else server
                if not self._exists(kind, name, on, main):
                    self.missing.add((kind, name))
                    self.add(
                        "error",
                        "tenant-object-missing",
                        f"tenant {tenant.slug}",
                        f"Its {what} {name!r} ({kind}) does not exist on server {on!r}: the "
                        "tenant's queries fail.",
                        f"restore it from a backup, or tenancy.delete_tenant({tenant.slug!r}) "
                        "and create it again",
                    )
        # the name a run_sql() sandbox of a shared or schema tenant logs in as
        sandboxes = {
            fdw_role_name(t.id, self.prefix): t.slug for t in tenants if t.strategy in ("shared", "schema")
        }
        for server in sorted(servers):
            for kind, name in self._prefixed(server, main):
                if (kind, name) in expected or (kind == "role" and is_keeper_role(self.config, name)):
                    continue
                owner = sandboxes.get(name) if kind == "role" else None
                if owner is not None:
                    self.add(
                        "warning",
                        "sandbox-role",
                        f"role {name} on server {server}",
                        f"A run_sql() sandbox role of tenant {owner!r}: a script is running for it "
                        "now, or a run crashed and left it (it can log in, bound to that tenant).",
                        f"if no script is running for {owner!r}, its next run_sql() replaces it; or, "
                        f"as a superuser: DROP OWNED BY {quote_ident(name)}; DROP ROLE {quote_ident(name)}",
                    )
                    continue
                drop = {
                    "database": f"DROP DATABASE {quote_ident(name)}",
                    "role": f"DROP OWNED BY {quote_ident(name)}; DROP ROLE {quote_ident(name)}",
                    "schema": f"DROP SCHEMA {quote_ident(name)} CASCADE",
                }[kind]
                self.add(
                    "warning",
                    "orphan",
                    f"{kind} {name} on server {server}",
                    f"The {kind} carries this Tenancy's prefix {self.prefix!r}, but no tenant "
                    "in the registry owns it (a failed clean-up, or a deletion done by hand).",
                    f"check that it holds nothing you need, then: {drop}",
                )

    def _moves(self, main: Connection, tenants: list[Tenant]) -> None:
        """Moves a crash interrupted: a read-only guard left in the main database (a shared or
        schema source), or a target's objects journaled in the row. A database source's guard is
        looked for in its own database (:meth:`_tenant_database`)."""
        guards = set(
            main.execute(
                text(
                    "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
                    "where n.nspname = :schema and starts_with(p.proname, :prefix)"
                ),
                {"schema": REGISTRY_SCHEMA, "prefix": MOVE_GUARD_PREFIX},
            ).scalars()
        )
        for tenant in tenants:
            if tenant.status != "active":
                continue
            guarded = f"{MOVE_GUARD_PREFIX}{tenant.id.hex}" in guards
            if guarded or tenant.location.get(MOVE_JOURNAL_KEY):
                self._interrupted_move(main, tenant, read_only=guarded)

    def _interrupted_move(self, main: Connection, tenant: Tenant, *, read_only: bool) -> None:
        """Report the leftovers of ``tenant``'s move, unless a move of it is running now (it holds
        the tenant's lock)."""
        if tenant.id in self.moves_reported:
            return
        if main.execute(text(locks.HOLDER), {"key": locks.tenant_key(tenant.slug)}).first() is not None:
            return
        self.moves_reported.add(tenant.id)
        left = []
        if read_only:
            left.append("its writes are refused by the move's read-only policies")
        if tenant.location.get(MOVE_JOURNAL_KEY):
            left.append("the target's objects (journaled in its registry row) are left")
        self.add(
            "warning",
            "move-interrupted",
            f"tenant {tenant.slug}",
            f"A move of the tenant stopped half-way (its process died): {' and '.join(left)}. It is "
            f"still a {tenant.strategy} tenant, with all its rows.",
            f"tenancy.move_tenant({tenant.slug!r}, {tenant.strategy!r}) undoes the move (or move it "
            "again to where it was going: the move cleans up first)",
        )

    def _exists(self, kind: str, name: str, server: str, main: Connection) -> bool:
        query = {
            "schema": "select 1 from pg_namespace where nspname = :n",
            "role": "select 1 from pg_roles where rolname = :n",
            "database": "select 1 from pg_database where datname = :n",
        }[kind]
        if server == "main":
            return main.execute(text(query), {"n": name}).first() is not None
        with self._on(server, self.config.server_admin_url(server).database or "postgres") as conn:
            return conn.execute(text(query), {"n": name}).first() is not None

    def _prefixed(self, server: str, main: Connection) -> list[tuple[str, str]]:
        like = self.prefix.replace("_", "\\_") + "\\_%"
        temporary = self.prefix.replace("_", "\\_") + "-new-%"
        query = text(
            "select 'database', datname from pg_database where datname like :p or datname like :t "
            "union all select 'role', rolname from pg_roles where rolname like :p "
            + (
                "union all select 'schema', nspname from pg_namespace where nspname like :p "
                if server == "main"
                else ""
            )
            + "order by 1, 2"
        )
        params = {"p": like, "t": temporary}
        if server == "main":
            return [(str(k), str(n)) for k, n in main.execute(query, params).all()]
        with self._on(server, self.config.server_admin_url(server).database or "postgres") as conn:
            return [(str(k), str(n)) for k, n in conn.execute(query, params).all()]

    def _migrations(self, tenants: list[Tenant]) -> None:
        heads = self.config.tenant_heads()
        if heads is None:
            return
        head = format_revision(heads)
        for tenant in tenants:
            if tenant.status in _LIVE and tenant.revision != head:
                self.add(
                    "warning",
                    "tenant-behind-head",
                    f"tenant {tenant.slug}",
                    f"The tenant is at revision {tenant.revision or 'base'}, not at the tenant "
                    f"stream's head {head}: code written for head may fail on it.",
                    f"sqla-tenancy migrate --tenant {tenant.slug}",
                )
        servers = {
            "main",
            *(str(t.location.get("server") or "main") for t in tenants if t.strategy == "database"),
        }
        if not any(t.strategy == "database" for t in tenants):
            return
        template = template_database(self.config)
        version_table = f"{REGISTRY_SCHEMA}.{VERSION_TABLES[TENANT]}"
        for server in sorted(servers):
            try:
                with self._on(server, template) as conn:
                    if conn.execute(text("select to_regclass(:t)"), {"t": version_table}).scalar() is None:
                        revision = None
                    else:
                        revision = format_revision(
                            conn.execute(text(f"select version_num from {version_table}")).scalars()
                        )
            except Exception as error:  # noqa: BLE001 - reported, the doctor goes on
                self.add(
                    "warning",
                    "template-unreachable",
                    f"database {template} on server {server}",
                    f"The template database cannot be read: {error}",
                    "tenancy.prepare_server(superuser_url, server)",
                )
                continue
            if revision != head:
                self.add(
                    "warning",
                    "template-behind-head",
                    f"database {template} on server {server}",
                    f"The template is at revision {revision or 'base'}, not at head {head}: "
                    "database tenants created now are born behind head.",
                    "sqla-tenancy migrate (the fleet runner migrates the template too)",
                )

    def _pool(self, tenants: list[Tenant]) -> None:
        target = self.config.pending_tenants.get("database")
        pending = sum(1 for t in tenants if t.status == "pending")
        if target is not None and pending < target:
            self.add(
                "warning",
                "pool-below-size",
                "the pool of pending database tenants",
                f"It holds {pending} of the {target} pending tenants configured "
                "(pending_tenants): the next database tenants are provisioned at sign-up, not "
                "claimed. A refill failed or has not run since the last claims.",
                "sqla-tenancy tenants pool --refill",
            )

    # -- database tenants ---------------------------------------------------------------------

    def _fdw_role(self, main: Connection, tenant: Tenant, main_database: str) -> None:
        role = str(tenant.location.get("fdw_role") or "")
        expected = fdw_role_name(tenant.id, self.prefix)
        if role != expected:
            self.add(
                "error",
                "fdw-role-unbound",
                f"tenant {tenant.slug}",
                f"Its FDW role is {role!r}, not {expected!r}: the main database's policy "
                "function derives the tenant from the FDW role's name, so this role's "
                "sessions are not bound to the tenant.",
                f"tenancy.delete_tenant({tenant.slug!r}) and create it again (its role names carry its id)",
            )
            role = role or expected
        row = main.execute(
            text(
                "select r.rolsuper or r.rolbypassrls, (select string_agg(g.rolname, ', ' order by g.rolname) "
                "from pg_roles g where g.oid <> r.oid and pg_has_role(r.oid, g.oid, 'MEMBER') "
                "and (g.rolsuper or g.rolbypassrls)) from pg_roles r where r.rolname = :r"
            ),
            {"r": role},
        ).first()
        if row is None:
            return  # reported by the registry check
        bypass, via = row
        r = quote_ident(role)
        if bypass:
            self.add(
                "error",
                "fdw-role-bypassrls",
                f"role {role}",
                f"The FDW role of tenant {tenant.slug!r} is a superuser or has BYPASSRLS: "
                "through its foreign tables the tenant reads every tenant's infrastructure rows.",
                f"ALTER ROLE {r} NOSUPERUSER NOBYPASSRLS",
            )
        if via:
            self.add(
                "error",
                "fdw-role-bypassrls",
                f"role {role}",
                f"The FDW role of tenant {tenant.slug!r} is a member of {via}, which bypass "
                "row-level security.",
                "; ".join(f"REVOKE {quote_ident(g.strip())} FROM {r}" for g in via.split(",")),
            )
        for database in databases_open_to(main, role, besides=[main_database]):
            self.add(
                "error",
                "role-opens-other-database",
                f"role {role}",
                f"The FDW role of tenant {tenant.slug!r} can connect to the database "
                f"{database.name!r}, which it does not need.",
                database.fix(role),
            )

    def _database_tenant(self, tenant: Tenant) -> None:
        server = str(tenant.location.get("server") or "main")
        database = str(tenant.location.get("database") or "")
        app_role = str(tenant.location.get("role") or "")
        where = f"database {database} (tenant {tenant.slug})"
        try:
            with self._on(server, database) as conn:
                self._tenant_database(conn, tenant, server, database, app_role, where)
        except Exception as error:  # noqa: BLE001 - one unreachable tenant must not hide the others
            if ("database", database) in self.missing:
                return  # reported as missing already
            self.add(
                "error",
                "tenant-database-unreachable",
                where,
                f"The tenant's database cannot be audited: {type(error).__name__}: {error}",
                "check that the server is up and the admin role may connect",
            )

    def _tenant_database(
        self, conn: Connection, tenant: Tenant, server: str, database: str, app_role: str, where: str
    ) -> None:
        schemas = [s for s in ("public", REGISTRY_SCHEMA) if s not in self.config.infrastructure_schemas]
        tables = self._tenant_tables(conn, ["public"])
        self._rls(conn, tables, where=where)
        guard = f"{REGISTRY_SCHEMA}.{MOVE_GUARD_PREFIX}{tenant.id.hex}()"
        if (
            tenant.status == "active"
            and conn.execute(text("select to_regprocedure(:f) is not null"), {"f": guard}).scalar()
        ):
            with self.services.engines.admin.connect() as main:
                self._interrupted_move(main, tenant, read_only=True)
        self._views(conn, tables, ["public"], where=where)
        self._functions(conn, schemas, where=where)
        if conn.execute(
            text("select has_database_privilege('public', current_database(), 'CONNECT')")
        ).scalar():
            self.add(
                "error",
                "tenant-database-public-connect",
                where,
                "PUBLIC may connect to this tenant's database: every other tenant's login role can open it.",
                f"REVOKE CONNECT, TEMPORARY ON DATABASE {quote_ident(database)} FROM PUBLIC; "
                f"GRANT CONNECT ON DATABASE {quote_ident(database)} TO {quote_ident(app_role)}",
            )
        if app_role:
            for other in databases_open_to(conn, app_role, besides=[database]):
                self.add(
                    "error",
                    "role-opens-other-database",
                    f"role {app_role}",
                    f"The login role of tenant {tenant.slug!r} can connect to the database "
                    f"{other.name!r} on server {server!r}, besides its own.",
                    other.fix(app_role),
                )
        expected = fdw_role_name(tenant.id, self.prefix)
        mappings = conn.execute(
            text(
                "select m.usename, (select option_value from pg_options_to_table(m.umoptions) "
                "where option_name = 'user') from pg_user_mappings m where m.srvname = :s order by 1"
            ),
            {"s": FOREIGN_SERVER},
        ).all()
        for local, remote in mappings:
            # PostgreSQL shows a mapping's options only to the mapped role and superusers: the
            # admin role's own mapping is read, the login role's is not (None).
            if remote is not None and remote != expected:
                self.add(
                    "error",
                    "fdw-mapping-unbound",
                    f"user mapping for {local} in {where}",
                    f"The user mapping logs in to the main database as {remote!r}, not as the "
                    f"tenant's FDW role {expected!r}: its foreign tables are not confined to "
                    "the tenant.",
                    f"ALTER USER MAPPING FOR {quote_ident(str(local))} SERVER {FOREIGN_SERVER} "
                    f"OPTIONS (SET user '{expected}', SET password '...'); or recreate the tenant",
                )
        self._foreign_tables(conn, where, tenant)

    def _foreign_tables(self, conn: Connection, where: str, tenant: Tenant) -> None:
        query = (
            "select n.nspname || '.' || c.relname, a.attname, format_type(a.atttypid, a.atttypmod) "
            "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped "
            "where c.relkind = :kind and n.nspname = any(:schemas) order by 1, a.attnum"
        )
        schemas = sorted(self.config.infrastructure_schemas)
        if not schemas:
            return
        local = _columns(conn.execute(text(query), {"kind": "f", "schemas": schemas}).all())
        with self.services.engines.admin.connect() as main:
            remote = _columns(main.execute(text(query), {"kind": "r", "schemas": schemas}).all())
            partitioned = _columns(main.execute(text(query), {"kind": "p", "schemas": schemas}).all())
        remote.update(partitioned)
        fix = f"tenancy.refresh_foreign_schemas({tenant.slug!r})"
        for table, columns in sorted(remote.items()):
            mine = local.get(table)
            if mine is None:
                self.add(
                    "warning",
                    "foreign-table-missing",
                    f"foreign table {table} in {where}",
                    "The main database has this infrastructure table, the tenant has no "
                    "foreign table for it.",
                    fix,
                )
            elif mine != columns:
                self.add(
                    "warning",
                    "foreign-table-differs",
                    f"foreign table {table} in {where}",
                    f"Its columns {_describe(mine)} differ from the main table's "
                    f"{_describe(columns)}: queries naming the changed columns fail.",
                    fix,
                )
        for table in sorted(set(local) - set(remote)):
            self.add(
                "warning",
                "foreign-table-stale",
                f"foreign table {table} in {where}",
                "The main database has no such table any more.",
                fix,
            )


def _columns(rows: Sequence[Any]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for table, column, kind in rows:
        out.setdefault(str(table), []).append((str(column), str(kind)))
    return out


def _describe(columns: list[tuple[str, str]]) -> str:
    return "(" + ", ".join(f"{c} {k}" for c, k in columns) + ")"
