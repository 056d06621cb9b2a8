"""Migration operations for row-level security (``op.enable_tenant_rls`` / ``op.disable_tenant_rls``)
and for Citus (``op.distribute_tenant_table``, ``op.make_reference_table``, ``op.undistribute_table``).

Autogenerate emits them for tables with a tenant discriminator (:class:`sqla_tenancy.TenantScoped`),
so a tenant table never reaches a database without its policies. They run the same DDL as
:meth:`Tenancy.install` (:mod:`sqla_tenancy.rls`): ENABLE and FORCE row-level security and one
policy per action comparing ``tenant_id`` with ``tenancy.current_tenant_id()``. Both are
idempotent, so re-running one is harmless.

On a distributed Tenancy (``Tenancy(distributed=True)``), autogenerate also emits
``op.distribute_tenant_table`` for a tenant table Citus does not distribute yet and
``op.make_reference_table`` for a table without a tenant column; they run
:func:`sqla_tenancy.distribution.distribute_table`, idempotent and a no-op on a database without
Citus.

Importing this module registers the operations and their renderers; the ``env.py`` helper and the
generated revision files import it.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, Operations
from sqlalchemy import Column, MetaData, Table

from sqla_tenancy.distribution import (
    defer_distribution,
    distribute_table,
    distribution_sql,
    undistribute_table,
)
from sqla_tenancy.identifiers import quote_ident, quote_literal
from sqla_tenancy.registry import REGISTRY_SCHEMA
from sqla_tenancy.rls import TENANT_ID_INFO_KEY, disable_rls_ddl, enable_rls_ddl

__all__ = [
    "DisableTenantRLSOp",
    "DistributeTenantTableOp",
    "EnableTenantRLSOp",
    "MakeReferenceTableOp",
    "UndistributeTableOp",
]

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


# -- Citus: distributed and reference tables ---------------------------------------------------

#: what a generated revision imports so that the distribution operations exist wherever it runs
_DISTRIBUTION_IMPORT = (
    "import alembic_ext.ops  # noqa: F401  (registers op.distribute_tenant_table and the like)"
)


class _DistributionOp(MigrateOperation):
    """What Citus makes of a table: distributed by its tenant column, or a reference table.

    The operations act on a database with the citus extension only, and leave a table Citus
    distributes or replicates already alone, so one revision runs unchanged on plain
    PostgreSQL (a developer's database, a database tenant's) and on a Citus coordinator."""

    name = ""

    def __init__(self, table_name: str, *, schema: str | None = None, tenant_column: str | None = None):
        self.table_name = table_name
        self.schema = schema
        self.tenant_column = tenant_column

    @property
    def qualified(self) -> str:
        name = quote_ident(self.table_name)
        return f"{quote_ident(self.schema)}.{name}" if self.schema else name

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (self.name, self.schema, self.table_name, self.tenant_column)


@Operations.register_operation("distribute_tenant_table")
class DistributeTenantTableOp(_DistributionOp):
    """Distribute a tenant table by its tenant column, colocated with the other tenant tables."""

    name = "distribute_tenant_table"

    def __init__(
        self, table_name: str, *, schema: str | None = None, tenant_column: str | None = "tenant_id"
    ):
        super().__init__(table_name, schema=schema, tenant_column=tenant_column or "tenant_id")

    @classmethod
    def distribute_tenant_table(
        cls,
        operations: Operations,
        table_name: str,
        *,
        tenant_column: str = "tenant_id",
        schema: str | None = None,
    ) -> Any:
        """On Citus, make ``table_name`` a distributed table by ``tenant_column``, colocated with
        the tenant tables distributed already (a no-op elsewhere, and when it is one)."""
        return operations.invoke(cls(table_name, tenant_column=tenant_column, schema=schema))

    def reverse(self) -> UndistributeTableOp:
        return UndistributeTableOp(self.table_name, schema=self.schema, tenant_column=self.tenant_column)


@Operations.register_operation("make_reference_table")
class MakeReferenceTableOp(_DistributionOp):
    """Make a table without a tenant column (global infrastructure) a reference table."""

    name = "make_reference_table"

    def __init__(self, table_name: str, *, schema: str | None = None, tenant_column: str | None = None):
        super().__init__(table_name, schema=schema, tenant_column=None)

    @classmethod
    def make_reference_table(
        cls, operations: Operations, table_name: str, *, schema: str | None = None
    ) -> Any:
        """On Citus, make ``table_name`` a reference table, copied to every node (a no-op
        elsewhere, and when it is one)."""
        return operations.invoke(cls(table_name, schema=schema))

    def reverse(self) -> UndistributeTableOp:
        return UndistributeTableOp(self.table_name, schema=self.schema)


@Operations.register_operation("undistribute_table")
class UndistributeTableOp(_DistributionOp):
    """Turn a distributed or reference table back into a table of the coordinator."""

    name = "undistribute_table"

    @classmethod
    def undistribute_table(
        cls,
        operations: Operations,
        table_name: str,
        *,
        schema: str | None = None,
        tenant_column: str | None = None,
    ) -> Any:
        """On Citus, turn ``table_name`` back into a table of the coordinator, with the tables
        its foreign keys connect it to (Citus cannot undistribute one of them alone;
        ``tenant_column`` only says what :meth:`reverse` redistributes it by)."""
        return operations.invoke(cls(table_name, schema=schema, tenant_column=tenant_column))

    def reverse(self) -> _DistributionOp:
        if self.tenant_column is None:
            return MakeReferenceTableOp(self.table_name, schema=self.schema)
        return DistributeTenantTableOp(self.table_name, schema=self.schema, tenant_column=self.tenant_column)


@Operations.implementation_for(DistributeTenantTableOp)
@Operations.implementation_for(MakeReferenceTableOp)
def _distribute(operations: Operations, operation: _DistributionOp) -> None:
    if operations.migration_context.as_sql:  # offline: the statement, unconditionally
        operations.execute(distribution_sql(operation.qualified, operation.tenant_column))
        return
    if defer_distribution(operation.qualified, operation.tenant_column):
        return  # the runner distributes it once the migrations' transaction has committed
    distribute_table(operations.get_bind(), operation.qualified, operation.tenant_column)


@Operations.implementation_for(UndistributeTableOp)
def _undistribute(operations: Operations, operation: UndistributeTableOp) -> None:
    if operations.migration_context.as_sql:
        operations.execute(f"SELECT undistribute_table({quote_literal(operation.qualified)})")
        return
    undistribute_table(operations.get_bind(), operation.qualified)


def _render_distribution(autogen_context: AutogenContext, operation: _DistributionOp) -> str:
    autogen_context.imports.add(_DISTRIBUTION_IMPORT)
    args = [repr(operation.table_name)]
    if operation.schema is not None:
        args.append(f"schema={operation.schema!r}")
    if operation.tenant_column is not None and (
        operation.tenant_column != "tenant_id" or isinstance(operation, UndistributeTableOp)
    ):
        args.append(f"tenant_column={operation.tenant_column!r}")
    return f"op.{operation.name}({', '.join(args)})"


renderers.dispatch_for(DistributeTenantTableOp)(_render_distribution)
renderers.dispatch_for(MakeReferenceTableOp)(_render_distribution)
renderers.dispatch_for(UndistributeTableOp)(_render_distribution)
