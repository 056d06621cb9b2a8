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

import contextvars
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table, text

from .binding import PROPAGATE_OPTION  # defined low: the engines use it
from .errors import ConfigurationError
from .identifiers import quote_ident, quote_literal
from .rls import qualified_name, tenant_column_name

if TYPE_CHECKING:
    from .config import TenancyConfig

__all__ = [
    "PROPAGATE_OPTION",
    "TRANSFER_MODES",
    "TenantNode",
    "check_distributable",
    "citus_in",
    "citus_kind",
    "defer_distribution",
    "deferring_distribution",
    "distribute_table",
    "distribute_tables",
    "distribution_sql",
    "move_schema_node",
    "move_tenant_node",
    "schema_node",
    "tenant_node",
    "prepare_distributed_ddl",
    "tenant_filter",
    "undistribute_table",
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


def citus_in(conn: Connection) -> bool:
    """Whether the database ``conn`` is connected to has the citus extension."""
    return conn.execute(text("select 1 from pg_extension where extname = 'citus'")).first() is not None


#: what Citus has made of a table, from ``pg_dist_partition`` (None: a plain PostgreSQL table)
_KIND_SQL = (
    "select case when p.partmethod = 'n' and p.repmodel = 't' then 'reference' "
    "when p.partmethod = 'n' and p.colocationid = 0 then 'local' else 'distributed' end "
    "from pg_dist_partition p where p.logicalrelid = cast(:t as regclass)"
)


def citus_kind(conn: Connection, table: str) -> str | None:
    """``"distributed"``, ``"reference"``, ``"local"`` (a Citus local table, which Citus makes of
    a plain table given a foreign key to a reference table) or None (not in Citus's metadata) for
    the table named ``table`` (a qualified, quoted name)."""
    kind = conn.execute(text(_KIND_SQL), {"t": table}).scalar()
    return str(kind) if kind is not None else None


def _colocation_anchor(conn: Connection, tenant_column: str) -> str | None:
    """A table already distributed by ``tenant_column`` (the oldest colocation group's): new
    tenant tables are colocated with it."""
    name = conn.execute(
        text(
            "select logicalrelid::regclass::text from pg_dist_partition where partmethod = 'h' "
            "and column_to_column_name(logicalrelid, partkey) = :c "
            "order by colocationid, logicalrelid::regclass::text limit 1"
        ),
        {"c": tenant_column},
    ).scalar()
    return str(name) if name is not None else None


def distribute_table(conn: Connection, table: str, tenant_column: str | None) -> bool:
    """Make ``table`` (a qualified, quoted name) a distributed table by ``tenant_column``,
    colocated with the tenant tables distributed already, or, with ``tenant_column=None``, a
    reference table. Idempotent: a table Citus distributes or replicates already is left alone
    (tables of a Citus distributed schema among them). Does nothing where the database has no
    citus extension, so that one migration serves plain PostgreSQL and Citus alike. True when
    the table changed."""
    if not citus_in(conn):
        return False
    if citus_kind(conn, table) in ("distributed", "reference"):
        return False
    if tenant_column is None:
        conn.execute(text("select create_reference_table(cast(:t as regclass))"), {"t": table})
        return True
    anchor = _colocation_anchor(conn, tenant_column)
    conn.execute(
        text("select create_distributed_table(cast(:t as regclass), :c, colocate_with => :anchor)"),
        {"t": table, "c": tenant_column, "anchor": anchor or "default"},
    )
    return True


def undistribute_table(conn: Connection, table: str) -> bool:
    """Turn a distributed or reference table back into a table of the coordinator (what
    reverses :func:`distribute_table`); a no-op where Citus does not know it."""
    if not citus_in(conn) or citus_kind(conn, table) not in ("distributed", "reference"):
        return False
    conn.execute(
        text("select undistribute_table(cast(:t as regclass), cascade_via_foreign_keys => true)"),
        {"t": table},
    )
    return True


_deferred: contextvars.ContextVar[list[tuple[str, str | None]] | None] = contextvars.ContextVar(
    "sqla_tenancy_deferred_distribution", default=None
)


@contextmanager
def deferring_distribution() -> Iterator[list[tuple[str, str | None]]]:
    """Collect, instead of running, the distributions migrations ask for in the block: the
    ``(table, tenant column)`` pairs, for :func:`distribute_table` once the migrations' transaction
    has committed. Citus records a new table's sequences on the workers over connections of its
    own, as a superuser, which do not see a sequence created in the same uncommitted transaction
    (``relation "..._id_seq" does not exist``): a table created and distributed in one
    transaction fails, unless the role running it is a superuser."""
    pending: list[tuple[str, str | None]] = []
    token = _deferred.set(pending)
    try:
        yield pending
    finally:
        _deferred.reset(token)


def defer_distribution(table: str, tenant_column: str | None) -> bool:
    """Inside :func:`deferring_distribution`, note the distribution and return True; else False."""
    pending = _deferred.get()
    if pending is None:
        return False
    if (table, tenant_column) not in pending:
        pending.append((table, tenant_column))
    return True


def distribution_sql(table: str, tenant_column: str | None) -> str:
    """The statement :func:`distribute_table` runs, for offline (``--sql``) migrations."""
    if tenant_column is None:
        return f"SELECT create_reference_table({quote_literal(table)})"
    return f"SELECT create_distributed_table({quote_literal(table)}, {quote_literal(tenant_column)})"


def distribute_tables(config: TenancyConfig, conn: Connection) -> list[str]:
    """Make the metadata's tables distributed (tenant-scoped, colocated) or reference tables
    (the others); tables Citus knows already are left alone. Returns the tables changed."""
    if not citus_in(conn):
        raise ConfigurationError(
            "distributed=True needs the citus extension in the main database "
            "(a superuser runs CREATE EXTENSION citus there, on a Citus coordinator)."
        )
    tables = config.metadata.sorted_tables
    check_distributable(tables)
    changed: list[str] = []
    # reference tables first: distributed tables may have foreign keys to them
    for table in sorted(tables, key=lambda t: tenant_column_name(t) is not None):
        if distribute_table(conn, qualified_name(table), tenant_column_name(table)):
            changed.append(_qualified(table))
    return changed


# -- where a tenant lives, and moving it ----------------------------------------------------------

#: Citus's ways of copying a shard: ``auto`` (logical replication when every table has a replica
#: identity, as tables with primary keys do), ``force_logical``, ``block_writes``
TRANSFER_MODES = ("auto", "force_logical", "block_writes")


@dataclass(frozen=True)
class TenantNode:
    """The Citus node holding a shared tenant's rows (all its tenant tables are colocated, so one
    node holds every one of them)."""

    #: Citus's id of the node (``pg_dist_node.nodeid``)
    node_id: int
    host: str
    port: int
    #: the shard of the colocation group's first table holding the tenant
    shard_id: int
    #: the shard holds this tenant alone (``isolate_tenant_to_new_shard`` made it)
    isolated: bool

    @property
    def address(self) -> str:
        """``host:port``, as :meth:`Tenancy.move_tenant_node` accepts it."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        isolated = ", isolated" if self.isolated else ""
        return f"{self.address} (node {self.node_id}, shard {self.shard_id}{isolated})"


def _anchor_or_fail(conn: Connection) -> str:
    anchor = _colocation_anchor(conn, "tenant_id")
    if anchor is None:
        raise ConfigurationError(
            "No table is distributed by tenant_id in this database: run tenancy.install() (or the "
            "migrations) on the Citus coordinator first."
        )
    return anchor


def tenant_node(conn: Connection, tenant_id: uuid.UUID) -> TenantNode:
    """Where Citus keeps ``tenant_id``'s rows, from its metadata
    (``get_shard_id_for_distribution_column``, ``pg_dist_placement``, ``pg_dist_node``)."""
    anchor = _anchor_or_fail(conn)
    row = conn.execute(
        text(
            "select s.shardid, n.nodeid, n.nodename, n.nodeport, s.shardminvalue = s.shardmaxvalue "
            "from pg_dist_shard s join pg_dist_placement p on p.shardid = s.shardid "
            "join pg_dist_node n on n.groupid = p.groupid and n.noderole = 'primary' "
            "where s.shardid = get_shard_id_for_distribution_column(cast(:t as regclass), cast(:id as uuid))"
        ),
        {"t": anchor, "id": str(tenant_id)},
    ).first()
    if row is None:
        raise ConfigurationError(f"Citus has no placement for the shard of tenant {tenant_id} of {anchor}.")
    return TenantNode(int(row[1]), str(row[2]), int(row[3]), int(row[0]), bool(row[4]))


def schema_node(conn: Connection, schema: str) -> TenantNode:
    """Where Citus keeps a schema tenant's distributed schema (schema-based sharding: all its
    tables are single-shard tables of one colocation group, on one node)."""
    row = conn.execute(
        text(
            "select s.shardid, n.nodeid, n.nodename, n.nodeport "
            "from pg_dist_partition t join pg_dist_shard s on s.logicalrelid = t.logicalrelid "
            "join pg_dist_placement p on p.shardid = s.shardid "
            "join pg_dist_node n on n.groupid = p.groupid and n.noderole = 'primary' "
            "join pg_class c on c.oid = t.logicalrelid "
            "where c.relnamespace = cast(:schema as regnamespace) order by s.shardid limit 1"
        ),
        {"schema": quote_ident(schema)},
    ).first()
    if row is None:
        raise ConfigurationError(
            f"Citus has no placement for the schema {schema!r}: it is not a distributed schema, or "
            "holds no table (was it created with distributed=True?)."
        )
    return TenantNode(int(row[1]), str(row[2]), int(row[3]), int(row[0]), True)


def move_schema_node(
    conn: Connection, schema: str, node: str | int, *, transfer_mode: str = "auto"
) -> TenantNode:
    """Move a schema tenant's distributed schema to another node (``citus_schema_move``: every
    table of the schema at once); as :func:`move_tenant_node` for ``conn`` and ``transfer_mode``."""
    if transfer_mode not in TRANSFER_MODES:
        raise ConfigurationError(
            f"transfer_mode must be one of {', '.join(TRANSFER_MODES)}, not {transfer_mode!r}."
        )
    target = _target_node(conn, node)
    if transfer_mode != "block_writes":
        _require_synchronous_commit(conn)
    if schema_node(conn, schema).node_id != target:
        conn.execute(
            text(
                "select citus_schema_move(cast(:schema as regnamespace), cast(:target as int), "
                f"{quote_literal(transfer_mode)})"
            ),
            {"schema": quote_ident(schema), "target": target},
        )
    return schema_node(conn, schema)


def _target_node(conn: Connection, node: str | int) -> int:
    rows = conn.execute(
        text(
            "select nodeid, nodename, nodeport from pg_dist_node where noderole = 'primary' "
            "and isactive and shouldhaveshards order by nodeid"
        )
    ).all()
    for node_id, host, port in rows:
        if node == node_id or node == f"{host}:{port}" or (isinstance(node, str) and node == str(node_id)):
            return int(node_id)
    listed = ", ".join(f"{host}:{port} (node {node_id})" for node_id, host, port in rows)
    raise ConfigurationError(
        f"{node!r} is not an active Citus worker that may hold shards; use one of: {listed}."
    )


def _require_synchronous_commit(conn: Connection) -> None:
    """Refuse a logical-replication move where the nodes acknowledge commits before writing them
    (``synchronous_commit = off``): Citus ends the copy once the new shard has replayed the old
    one's WAL up to ``pg_current_wal_lsn()``, and a commit still in the WAL buffers then is
    acknowledged to its client and never copied. Our move test lost such writes."""
    rows = (
        conn.execute(
            text(
                "select nodename || ':' || nodeport "
                "from run_command_on_all_nodes('show synchronous_commit') r "
                "join pg_dist_node n using (nodeid) where r.result = 'off'"
            )
        )
        .scalars()
        .all()
    )
    if rows:
        raise ConfigurationError(
            f"synchronous_commit is off on {', '.join(rows)}: a move by logical replication can lose "
            "writes committed during its switch-over there. Set it on (ALTER SYSTEM SET "
            "synchronous_commit = on; SELECT pg_reload_conf() on those nodes), or move with "
            "transfer_mode='block_writes'."
        )


def move_tenant_node(
    conn: Connection, tenant_id: uuid.UUID, node: str | int, *, transfer_mode: str = "auto"
) -> TenantNode:
    """Move a tenant's rows to another node with Citus's own tools: its shards are split so that
    it has shards of its own (``isolate_tenant_to_new_shard``, every colocated table at once),
    then those are moved (``citus_move_shard_placement``). ``conn`` is in autocommit mode (both
    refuse to run in a transaction block). With ``transfer_mode`` ``auto`` or ``force_logical``
    the shards are copied by logical replication and the tenant keeps writing (its writes wait
    only for the final switch-over); that needs ``wal_level = logical`` on the nodes. With
    ``block_writes`` the tenant's writes (and those of the tenants sharing its shard, during the
    split) wait for the copy. Reads go on throughout. Returns where the tenant is now."""
    if transfer_mode not in TRANSFER_MODES:
        raise ConfigurationError(
            f"transfer_mode must be one of {', '.join(TRANSFER_MODES)}, not {transfer_mode!r}."
        )
    target = _target_node(conn, node)
    if transfer_mode != "block_writes":
        _require_synchronous_commit(conn)
    anchor = _anchor_or_fail(conn)
    current = tenant_node(conn, tenant_id)
    if current.node_id == target:
        return current
    if not current.isolated:
        conn.execute(
            text(
                "select isolate_tenant_to_new_shard(cast(:t as regclass), cast(:id as uuid), 'CASCADE', "
                f"shard_transfer_mode => {quote_literal(transfer_mode)})"
            ),
            {"t": anchor, "id": str(tenant_id)},
        )
        current = tenant_node(conn, tenant_id)
    conn.execute(
        text(
            "select citus_move_shard_placement(cast(:shard as bigint), cast(:source as int), "
            f"cast(:target as int), {quote_literal(transfer_mode)})"
        ),
        {"shard": current.shard_id, "source": current.node_id, "target": target},
    )
    return tenant_node(conn, tenant_id)


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
