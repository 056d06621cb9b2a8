"""Autogenerate and tenant keys (:mod:`sqla_tenancy.keys`): the order of key operations.

Moving existing tables to tenant keys takes, in one revision, ``UNIQUE (tenant_id, id)`` on the
referenced tables, the composite foreign keys, and the drop of the old ones. Alembic emits each
table's operations together, new tables first and existing tables in alphabetical order, so a
foreign key can come before the unique constraint it references (``comments`` is migrated before
``posts``), and PostgreSQL refuses it. :func:`order_key_operations` fixes the order.
"""

from __future__ import annotations

from alembic.operations import ops
from sqlalchemy import ForeignKeyConstraint

__all__ = ["order_key_operations"]

_TableKey = tuple[str | None, str]


def order_key_operations(upgrade: ops.UpgradeOps) -> bool:
    """Reorder ``upgrade`` in place so that PostgreSQL accepts it; True when anything moved.

    Every foreign key's drop goes first and every foreign key's creation last (a drop depends on
    nothing; a creation on nothing but tables, columns and unique keys, all made by then). An
    existing table's new unique keys go before the new tables whose CREATE TABLE references it.
    Nothing else moves.
    """
    drops: list[ops.MigrateOperation] = []
    creations: list[ops.MigrateOperation] = []
    middle: list[ops.MigrateOperation] = []
    for op in upgrade.ops:
        if not isinstance(op, ops.ModifyTableOps):
            middle.append(op)
            continue
        parts: tuple[list[ops.MigrateOperation], ...] = ([], [], [])
        for inner in op.ops:
            if isinstance(inner, ops.DropConstraintOp) and inner.constraint_type == "foreignkey":
                parts[0].append(inner)
            elif isinstance(inner, ops.CreateForeignKeyOp):
                parts[2].append(inner)
            else:
                parts[1].append(inner)
        for part, into in zip(parts, (drops, middle, creations), strict=True):
            if part:
                into.append(ops.ModifyTableOps(op.table_name, part, schema=op.schema))
    ordered = [*drops, *_referenced_tables_first(middle), *creations]
    if _leaves(ordered) == _leaves(upgrade.ops):
        return False
    upgrade.ops[:] = ordered
    return True


def _referenced_tables_first(middle: list[ops.MigrateOperation]) -> list[ops.MigrateOperation]:
    """Move the changes of an existing table that add a unique key, when a new table references
    that table in its CREATE TABLE, before the first new table."""
    new_tables = [o for o in middle if isinstance(o, ops.CreateTableOp)]
    if not new_tables:
        return middle
    created = {(o.schema, o.table_name) for o in new_tables}
    referenced: set[_TableKey] = set()
    for table in new_tables:
        for item in table.columns:
            if isinstance(item, ForeignKeyConstraint) and item.elements:
                schema, _, name = item.elements[0].target_fullname.rsplit(".", 1)[0].rpartition(".")
                referenced.add((schema or None, name))
    early = [
        o
        for o in middle
        if isinstance(o, ops.ModifyTableOps)
        and (o.schema, o.table_name) in referenced - created
        and any(_adds_unique_key(inner) for inner in o.ops)
    ]
    rest = [o for o in middle if all(o is not e for e in early)]
    first_new = next(i for i, o in enumerate(rest) if isinstance(o, ops.CreateTableOp))
    return [*rest[:first_new], *early, *rest[first_new:]]


def _adds_unique_key(op: ops.MigrateOperation) -> bool:
    if isinstance(op, ops.CreateIndexOp):
        return bool(op.unique)
    return isinstance(op, ops.CreateUniqueConstraintOp)


def _leaves(operations: list[ops.MigrateOperation]) -> list[int]:
    leaves: list[int] = []
    for op in operations:
        leaves += [id(o) for o in op.ops] if isinstance(op, ops.ModifyTableOps) else [id(op)]
    return leaves
