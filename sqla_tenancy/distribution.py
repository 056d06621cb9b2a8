"""The shared placement on Citus (``Tenancy(..., distributed=True)``).

Citus's multi-tenant model maps onto the shared placement: every tenant-scoped table is a
distributed table with ``tenant_id`` as its distribution column, all of them colocated (one
tenant's rows of every table on the same node, so joins and foreign keys between them stay on
one node); tables without ``tenant_id`` (global infrastructure) are reference tables, copied to
every node. The registry (``tenancy.tenants``) stays a local table of the coordinator: only the
library reads it, never in a query with tenant tables.

Three things make it work, and this module holds them:

* :func:`distribute_tables` (run by ``install()``), idempotent;
* the propagation of the binding: row-level security is evaluated on the workers, and Citus's
  default ``citus.propagate_set_commands = 'none'`` keeps ``SET LOCAL app.current_tenant_id`` on
  the coordinator, where the workers' policies would see no tenant (they fail closed: zero rows).
  The application engines connect with :data:`PROPAGATE_OPTION` (``-c
  citus.propagate_set_commands=local``), so the binding stays the one round trip it is elsewhere;
* :func:`tenant_filter`, a second line the sessions add to ORM statements (``WHERE tenant_id =
  <the active tenant>`` on every tenant-scoped entity) so that Citus routes a tenant's query to
  the one node holding the tenant instead of asking every shard. RLS still decides what is seen.

Citus requires every primary and unique key of a distributed table to contain the distribution
column: :func:`check_distributable` names the tables whose primary key lacks ``tenant_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table, text

from .binding import PROPAGATE_OPTION  # defined low: the engines use it
from .errors import ConfigurationError
from .identifiers import quote_literal
from .rls import tenant_column_name

if TYPE_CHECKING:
    from .config import TenancyConfig

__all__ = [
    "PROPAGATE_OPTION",
    "check_distributable",
    "distribute_tables",
    "prepare_distributed_ddl",
    "tenant_filter",
]


def _qualified(table: Table) -> str:
    return f"{table.schema}.{table.name}" if table.schema else table.name


def prepare_distributed_ddl(conn: Connection) -> None:
    """Settings for the transaction that distributes the tables: every
    object is created on the workers at once (Citus would otherwise defer a schema created after
    other statements of the transaction, and distributing a table in it then fails on the
    workers), and multi-shard commands run sequentially, as Citus needs in a transaction that
    created the tables it distributes."""
    conn.exec_driver_sql("SET LOCAL citus.create_object_propagation TO 'immediate'")
    conn.exec_driver_sql("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")


def check_distributable(tables: list[Table]) -> None:
    """:class:`ConfigurationError` naming every tenant-scoped table whose primary key lacks
    ``tenant_id`` (Citus cannot distribute it by tenant), with the declaration that fixes it."""
    wrong = []
    for table in tables:
        column = tenant_column_name(table)
        if column is not None and column not in {c.name for c in table.primary_key.columns}:
            keys = ", ".join(repr(c.name) for c in table.primary_key.columns)
            wrong.append(f"{_qualified(table)} (primary key ({keys}))")
    if wrong:
        raise ConfigurationError(
            "distributed=True: Citus distributes tenant tables by tenant_id, so their primary keys "
            f"must contain it; these do not: {'; '.join(wrong)}. Declare e.g. "
            "__table_args__ = (PrimaryKeyConstraint('tenant_id', 'id'),)."
        )


def distribute_tables(config: TenancyConfig, conn: Connection) -> list[str]:
    """Make the metadata's tables distributed (tenant-scoped, colocated) or reference tables
    (the others); tables Citus knows already are left alone. Returns the tables changed."""
    if conn.execute(text("select 1 from pg_extension where extname = 'citus'")).first() is None:
        raise ConfigurationError(
            "distributed=True needs the citus extension in the main database "
            "(a superuser runs CREATE EXTENSION citus there, on a Citus coordinator)."
        )
    tables = config.metadata.sorted_tables
    check_distributable(tables)
    known = set(
        conn.execute(text("select logicalrelid::regclass::text from pg_dist_partition")).scalars().all()
    )
    changed: list[str] = []
    anchor: str | None = next(
        (_qualified(t) for t in tables if tenant_column_name(t) is not None and _qualified(t) in known), None
    )
    # reference tables first: distributed tables may have foreign keys to them
    for table in tables:
        name = _qualified(table)
        if tenant_column_name(table) is None and name not in known:
            conn.execute(text("select create_reference_table(cast(:t as regclass))"), {"t": name})
            changed.append(name)
    for table in tables:
        column, name = tenant_column_name(table), _qualified(table)
        if column is None or name in known:
            continue
        colocate = quote_literal(anchor) if anchor else "'default'"
        conn.exec_driver_sql(
            f"select create_distributed_table({quote_literal(name)}, {quote_literal(column)}, "
            f"colocate_with => {colocate})"
        )
        anchor = anchor or name
        changed.append(name)
    return changed


def tenant_filter(current: Callable[[], uuid.UUID | None]) -> Callable[[Any], None]:
    """A ``do_orm_execute`` listener adding ``tenant_id = <active tenant>`` to every tenant-scoped
    entity of ORM statements (none inside ``platform_context``, which spans tenants)."""
    from sqlalchemy.orm import with_loader_criteria

    from .models import TenantScoped

    def add_filter(state: Any) -> None:
        if not (state.is_select or state.is_update or state.is_delete):
            return
        tenant_id = current()
        if tenant_id is None:
            return
        state.statement = state.statement.options(
            with_loader_criteria(
                TenantScoped,
                lambda cls: cls.tenant_id == tenant_id,
                include_aliases=True,
                track_closure_variables=True,
            )
        )

    return add_filter
