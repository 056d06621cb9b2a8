"""Shared placement: the tenant's rows live in the main database's tables, tagged with
``tenant_id`` and guarded by row-level security (see :mod:`sqla_tenancy.rls`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table, text
from sqlalchemy.engine import URL, Engine

from ..anonymous import anonymous_role, refuse_anonymous_without_login
from ..binding import (
    binding_statement,
    distributed_binding_statement,
    migration_binding_statement,
    tenant_setting,
)
from ..errors import ProvisioningError
from ..identifiers import quote_ident
from ..keys import check_tenant_keys
from ..rls import is_tenant_scoped, qualified_name, tenant_column_name
from .base import MigrationSite, PlacementBase

if TYPE_CHECKING:
    from ..registry import Tenant

__all__ = ["SharedPlacement", "delete_tenant_rows", "main_tenant_revision"]


def delete_tenant_rows(tenant: Tenant, tables: Iterable[Table], *, admin: Connection) -> None:
    """Delete ``tenant``'s rows from every tenant-scoped table among ``tables`` (children first)."""
    # Bind the admin transaction to the tenant as well, so RLS confines the deletes even when the
    # admin role does not bypass it.
    admin.exec_driver_sql(tenant_setting(tenant.id))
    for table in tables:
        column = tenant_column_name(table)
        if column is None:
            continue
        admin.execute(
            text(f"DELETE FROM {qualified_name(table)} WHERE {quote_ident(column)} = :tid"),
            {"tid": tenant.id},
        )


def main_tenant_revision(conn: Connection) -> str | None:
    """The tenant stream's revision of the main database's tenant tables (None: not managed by
    migrations, or at base)."""
    if conn.execute(text("select to_regclass('tenancy.alembic_tenant')")).scalar() is None:
        return None
    value = conn.execute(
        text("select string_agg(version_num, ',' order by version_num) from tenancy.alembic_tenant")
    ).scalar()
    return value if isinstance(value, str) else None


class SharedPlacement(PlacementBase):
    """Rows in the main database, isolated by RLS on ``tenant_id``."""

    name = "shared"
    transactional = True
    admitted = True
    per_tenant_engines = False

    def initial_location(self, server: str | None) -> dict[str, Any]:
        if server is not None:
            raise ProvisioningError("server= applies to placement='database' only.")
        return {}

    def provision(self, tenant: Tenant, *, admin: Connection | None) -> dict[str, Any]:
        # The tables exist already (install() / migrations); a shared tenant is only a registry
        # row. Refuse when a tenant table in the main database cannot be isolated by RLS.
        unscoped = [t.fullname for t in self.config.tenant_tables() if not is_tenant_scoped(t)]
        if unscoped:
            raise ProvisioningError(
                "Shared tenants need every tenant table to carry tenant_id, but "
                f"{', '.join(sorted(unscoped))} do(es) not: add the TenantScoped mixin, move the "
                "table to an infrastructure schema, or give this tenant another placement."
            )
        # Its rows would share tables with other tenants: keys must not cross tenants.
        check_tenant_keys(self.config.metadata, infrastructure_schemas=self.config.infrastructure_schemas)
        return {"_revision": main_tenant_revision(admin)} if admin is not None else {}

    def deprovision(
        self, tenant: Tenant, *, admin: Connection | None, keep_infrastructure_rows: bool
    ) -> None:
        assert admin is not None
        tables = self.config.tenant_tables()
        if not keep_infrastructure_rows:
            tables += self.config.infrastructure_tables()
        order = {t: i for i, t in enumerate(self.config.metadata.sorted_tables)}
        delete_tenant_rows(tenant, sorted(tables, key=order.__getitem__, reverse=True), admin=admin)

    def compensate(self, tenant: Tenant) -> None:
        """Nothing to do: provisioning is transactional."""

    def derived_names(self, tenant: Tenant) -> dict[tuple[str, str], str]:
        return {}  # a shared tenant is a registry row, nothing named

    def migration_site(self, tenant: Tenant) -> MigrationSite | None:
        return None  # the main database's tables, migrated once for every shared tenant

    def migration_binding(self, tenant: Tenant) -> str:
        return migration_binding_statement(tenant.id)

    def after_migration(self, conn: Connection, tenant: Tenant, *, created: bool) -> None:
        """Nothing per tenant: the main database's tables are granted for every shared tenant."""

    def dump_target(self, tenant: Tenant) -> tuple[URL, str] | None:
        return None  # its rows share the main database's tables: exported row by row

    def binding(self, tenant: Tenant) -> bytes:
        if self.config.distributed:
            return distributed_binding_statement(tenant.id)
        return binding_statement(tenant.id)

    def anonymous_binding(self, tenant: Tenant) -> bytes:
        refuse_anonymous_without_login(self.config)
        if self.config.distributed:
            return distributed_binding_statement(tenant.id, role=anonymous_role(self.config))
        return binding_statement(tenant.id, role=anonymous_role(self.config))

    def engine(self, tenant: Tenant, *, async_: bool) -> Engine:
        return self.engines.main(async_)
