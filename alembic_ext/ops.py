"""Migration operations for row-level security: ``op.enable_tenant_rls`` / ``op.disable_tenant_rls``.

Autogenerate emits them for tables with a tenant discriminator (:class:`sqla_tenancy.TenantScoped`),
so a tenant table never reaches a database without its policies. They run the same DDL as
:meth:`Tenancy.install` (:mod:`sqla_tenancy.rls`): ENABLE and FORCE row-level security and one
policy per action comparing ``tenant_id`` with ``tenancy.current_tenant_id()``. Both are
idempotent, so re-running one is harmless.

Importing this module registers the operations and their renderers; the ``env.py`` helper and the
generated revision files import it.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, Operations
from sqlalchemy import Column, MetaData, Table

from sqla_tenancy.registry import REGISTRY_SCHEMA
from sqla_tenancy.rls import TENANT_ID_INFO_KEY, disable_rls_ddl, enable_rls_ddl

__all__ = ["DisableTenantRLSOp", "EnableTenantRLSOp"]

#: what a generated revision imports so that ``op.enable_tenant_rls`` exists wherever it runs
_IMPORT = "import alembic_ext.ops  # noqa: F401  (registers op.enable_tenant_rls / op.disable_tenant_rls)"


def _table(table_name: str, tenant_column: str, schema: str | None) -> Table:
    return Table(
        table_name, MetaData(), Column(tenant_column, info={TENANT_ID_INFO_KEY: True}), schema=schema
    )


class _TenantRLSOp(MigrateOperation):
    """A table's tenant RLS, switched on or off (the two operations differ in name only)."""

    name = ""

    def __init__(self, table_name: str, *, tenant_column: str = "tenant_id", schema: str | None = None):
        self.table_name = table_name
        self.tenant_column = tenant_column
        self.schema = schema

    def _args(self) -> dict[str, Any]:
        return {"tenant_column": self.tenant_column, "schema": self.schema}

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (self.name, self.schema, self.table_name, self.tenant_column)


@Operations.register_operation("enable_tenant_rls")
class EnableTenantRLSOp(_TenantRLSOp):
    """Enable and force row-level security on a tenant table, with the tenant policies."""

    name = "enable_tenant_rls"

    @classmethod
    def enable_tenant_rls(
        cls,
        operations: Operations,
        table_name: str,
        *,
        tenant_column: str = "tenant_id",
        schema: str | None = None,
    ) -> Any:
        """Enable and force row-level security on ``table_name``, with one tenant policy per action."""
        return operations.invoke(cls(table_name, tenant_column=tenant_column, schema=schema))

    def reverse(self) -> DisableTenantRLSOp:
        return DisableTenantRLSOp(self.table_name, **self._args())


@Operations.register_operation("disable_tenant_rls")
class DisableTenantRLSOp(_TenantRLSOp):
    """Drop the tenant policies of a table and disable row-level security on it."""

    name = "disable_tenant_rls"

    @classmethod
    def disable_tenant_rls(
        cls,
        operations: Operations,
        table_name: str,
        *,
        tenant_column: str = "tenant_id",
        schema: str | None = None,
    ) -> Any:
        """Drop the tenant policies of ``table_name`` and disable row-level security on it."""
        return operations.invoke(cls(table_name, tenant_column=tenant_column, schema=schema))

    def reverse(self) -> EnableTenantRLSOp:
        return EnableTenantRLSOp(self.table_name, **self._args())


@Operations.implementation_for(EnableTenantRLSOp)
def _enable(operations: Operations, operation: EnableTenantRLSOp) -> None:
    table = _table(operation.table_name, operation.tenant_column, operation.schema)
    for statement in enable_rls_ddl(table, function_schema=REGISTRY_SCHEMA):
        operations.execute(statement)


@Operations.implementation_for(DisableTenantRLSOp)
def _disable(operations: Operations, operation: DisableTenantRLSOp) -> None:
    table = _table(operation.table_name, operation.tenant_column, operation.schema)
    for statement in disable_rls_ddl(table):
        operations.execute(statement)


def _render_args(operation: _TenantRLSOp) -> str:
    args = [repr(operation.table_name)]
    if operation.tenant_column != "tenant_id":
        args.append(f"tenant_column={operation.tenant_column!r}")
    if operation.schema is not None:
        args.append(f"schema={operation.schema!r}")
    return ", ".join(args)


@renderers.dispatch_for(EnableTenantRLSOp)
def _render_enable(autogen_context: AutogenContext, operation: EnableTenantRLSOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return f"op.enable_tenant_rls({_render_args(operation)})"


@renderers.dispatch_for(DisableTenantRLSOp)
def _render_disable(autogen_context: AutogenContext, operation: DisableTenantRLSOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return f"op.disable_tenant_rls({_render_args(operation)})"
