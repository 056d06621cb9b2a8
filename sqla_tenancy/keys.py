"""Keys that include the tenant: foreign keys and unique constraints that are safe in shared tables.

PostgreSQL checks foreign keys, primary keys and unique constraints, and runs ``ON DELETE`` /
``ON UPDATE`` actions, *without* row-level security: those checks see every tenant's rows. In a
table shared by tenants, a plain ``FOREIGN KEY (project_id) REFERENCES projects (id)`` lets one
tenant attach its rows to another tenant's project (whose deletion then cascades into them), and a
plain ``UNIQUE (email)`` answers a second tenant's insert with a duplicate-key error that tells it
the address exists elsewhere. Keys that start with the tenant column keep every check within one
tenant; they are also the keys Citus needs to distribute tables by tenant.

The declarations, for declarative ``__table_args__`` and Core ``Table(...)`` alike:

:func:`tenant_foreign_key`
    ``FOREIGN KEY (tenant_id, project_id) REFERENCES projects (tenant_id, id)``.
:func:`tenant_unique`
    ``UNIQUE (tenant_id, email)``.
:func:`unique_across_tenants`
    ``UNIQUE (email)`` on purpose, for a value unique across every tenant (in an infrastructure
    table), accepting that a tenant learns that a value exists elsewhere.

:class:`~sqla_tenancy.TenantScoped` gives each table it maps ``UNIQUE (tenant_id, <primary key>)``
(named ``<table>_tenant_key``), the target tenant foreign keys need. :func:`unsafe_keys` lists the
keys of a MetaData that cross tenants; :meth:`Tenancy.install`, creating a shared tenant and the
Alembic extension's autogenerate refuse them (:class:`~sqla_tenancy.UnsafeKeyError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from sqlalchemy import Column, ForeignKey, ForeignKeyConstraint, Index, MetaData, Table, UniqueConstraint
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import ArgumentError, NoReferencedColumnError, NoReferencedTableError
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.base import SchemaEventTarget

from .errors import UnsafeKeyError
from .rls import tenant_column_name

__all__ = [
    "ACROSS_TENANTS_INFO_KEY",
    "ColumnRef",
    "UnsafeKey",
    "add_tenant_key",
    "check_tenant_keys",
    "tenant_foreign_key",
    "tenant_key_name",
    "tenant_unique",
    "unique_across_tenants",
    "unsafe_keys",
]

#: ``info`` key of a unique constraint or unique index that is unique across tenants on purpose
#: (what :func:`unique_across_tenants` sets; set it on an ``Index(..., unique=True)`` yourself).
ACROSS_TENANTS_INFO_KEY = "sqla_tenancy.across_tenants"

#: A column, as the helpers take it: its name (``"project_id"``, ``"projects.id"``), the
#: ``Column``, or a mapped attribute (``Project.id``).
ColumnRef = Union[str, "Column[Any]", "QueryableAttribute[Any]"]

_MAX_IDENTIFIER_BYTES = 63
_KEY_SUFFIX = "_tenant_key"
# quotes a name only where PostgreSQL would (as pg_get_constraintdef() renders it)
_PREPARER = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]


def _bounded_name(stem: str, suffix: str) -> str:
    """``stem + suffix``, the stem shortened (with a hash of it) to fit PostgreSQL's 63 bytes."""
    name = f"{stem}{suffix}"
    if len(name.encode()) <= _MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(stem.encode()).hexdigest()[:8]
    while len(f"{stem}_{digest}{suffix}".encode()) > _MAX_IDENTIFIER_BYTES:
        stem = stem[:-1]
    return f"{stem}_{digest}{suffix}"


def tenant_key_name(table_name: str) -> str:
    """The name of the ``UNIQUE (tenant_id, <primary key>)`` that :class:`TenantScoped` adds:
    ``<table>_tenant_key`` (shortened with a hash beyond PostgreSQL's 63 bytes)."""
    return _bounded_name(table_name, _KEY_SUFFIX)


def _default_name(
    constraint: UniqueConstraint | ForeignKeyConstraint,
    table: Table,
    conventions: tuple[object, ...],
    suffix: str,
) -> None:
    """Name an unnamed constraint as PostgreSQL would (``<table>_<columns>_key`` / ``_fkey``),
    so that a migration can drop it by name, unless the MetaData's naming convention names it."""
    if constraint.name is None and not any(c in table.metadata.naming_convention for c in conventions):
        names = [_name_of(c) for c in constraint._pending_colargs if c is not None]
        constraint.name = _bounded_name(f"{table.name}_{'_'.join(names)}", suffix)


def _name_of(column: Any) -> str:
    """The name of a column given as a string, a Column or an ORM attribute."""
    if isinstance(column, str):
        return column
    element = column.__clause_element__() if hasattr(column, "__clause_element__") else column
    name = getattr(element, "name", None)
    if not isinstance(name, str):
        raise ArgumentError(f"{column!r} is not a column: name columns by string or Column.")
    return name


def _require_tenant_column(table: Table, helper: str) -> str:
    column = tenant_column_name(table)
    if column is None:
        raise ArgumentError(
            f"{helper}() on table {table.fullname!r}, which has no tenant column: make the model "
            "TenantScoped (Core: put tenant_id_column() among the table's columns, before the "
            "constraint), or use a plain constraint on a table that is not tenant-scoped."
        )
    return column


class _TenantUniqueConstraint(UniqueConstraint):
    """A UNIQUE constraint that puts its table's tenant column first when it attaches (the
    column's name is known only then: :func:`tenant_id_column` may call it anything)."""

    _tenancy_resolved = False

    def _set_parent(self, parent: SchemaEventTarget, **kw: Any) -> None:
        if not self._tenancy_resolved and isinstance(parent, Table):
            self._tenancy_resolved = True
            tenant = _require_tenant_column(parent, "tenant_unique")
            if tenant not in [_name_of(c) for c in self._pending_colargs if c is not None]:
                self._pending_colargs.insert(0, tenant)
            _default_name(self, parent, ("uq", UniqueConstraint), "_key")
        super()._set_parent(parent, **kw)


class _TenantForeignKeyConstraint(ForeignKeyConstraint):
    """A FOREIGN KEY that pairs its table's tenant column with the referenced table's when it
    attaches; see :func:`tenant_foreign_key`."""

    _tenancy_resolved = False

    def _set_parent(self, parent: SchemaEventTarget, **kw: Any) -> None:
        if not self._tenancy_resolved and isinstance(parent, Table):
            self._tenancy_resolved = True
            tenant = _require_tenant_column(parent, "tenant_foreign_key")
            if tenant not in [_name_of(c) for c in self._pending_colargs if c is not None]:
                self._pending_colargs.insert(0, tenant)
                self.elements.insert(
                    0,
                    ForeignKey(
                        _referred_tenant_column(parent, self.elements[0], tenant),
                        _constraint=self,
                        name=self.name,
                        onupdate=self.onupdate,
                        ondelete=self.ondelete,
                        use_alter=self.use_alter,
                        link_to_name=self.link_to_name,
                        match=self.match,
                        deferrable=self.deferrable,
                        initially=self.initially,
                        **self.dialect_kwargs,
                    ),
                )
            _default_name(self, parent, ("fk", ForeignKeyConstraint), "_fkey")
        super()._set_parent(parent, **kw)


def _referred_tenant_column(parent: Table, element: ForeignKey, default: str) -> str:
    """``<referenced table>.<its tenant column>``: that table's marked column when the table is
    known by now, else the referring table's tenant column name (:func:`unsafe_keys` reports a
    pair that does not match)."""
    table_key = element.target_fullname.rsplit(".", 1)[0]
    metadata = parent.metadata
    table = metadata.tables.get(table_key)
    if table is None and metadata.schema is not None:
        table = metadata.tables.get(f"{metadata.schema}.{table_key}")
    name = (tenant_column_name(table) if table is not None else None) or default
    return f"{table_key}.{name}"


def _restricted_action(action: str | None, columns: Sequence[str]) -> str | None:
    """``SET NULL`` / ``SET DEFAULT`` limited to ``columns``: on the whole composite key it would
    set the tenant column too (NULL: refused by NOT NULL, so the parent's delete would fail)."""
    if action is None or action.strip().upper() not in ("SET NULL", "SET DEFAULT"):
        return action
    return f"{action.strip()} ({', '.join(_PREPARER.quote(c) for c in columns)})"


def tenant_foreign_key(
    columns: ColumnRef | Sequence[ColumnRef], refcolumns: ColumnRef | Sequence[ColumnRef], **fk_kwargs: Any
) -> ForeignKeyConstraint:
    """A foreign key between two tenant-scoped tables that includes the tenant column on both
    sides, so that PostgreSQL checks it, and runs its ``ON DELETE`` / ``ON UPDATE``, within one
    tenant::

        class Task(TenantScoped, Base):
            __tablename__ = "tasks"
            __table_args__ = (tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),)

            project_id: Mapped[int]

    is ``FOREIGN KEY (tenant_id, project_id) REFERENCES projects (tenant_id, id) ON DELETE
    CASCADE``. The tenant columns are the tables' own (the column marked by
    :class:`TenantScoped` / :func:`tenant_id_column`, whatever its name), resolved when the
    constraint attaches to its table. Unnamed, it is named as PostgreSQL would
    (``tasks_tenant_id_project_id_fkey``) unless the MetaData's naming convention names foreign
    keys, so that migrations can drop it. The referenced table needs ``UNIQUE (tenant_id, id)``:
    :class:`TenantScoped` adds it; in Core, add :func:`tenant_unique` ``("id")``.

    ``fk_kwargs`` are :class:`~sqlalchemy.schema.ForeignKeyConstraint`'s (``ondelete``,
    ``onupdate``, ``name``, ``deferrable``, ...). ``ondelete="SET NULL"`` (or ``SET DEFAULT``)
    becomes ``SET NULL (project_id)``: the tenant column is never set to NULL (PostgreSQL 15+).
    """
    # (SQLAlchemy takes the same column forms; its own types for them are private)
    local: list[Any] = list(columns) if isinstance(columns, (list, tuple)) else [columns]
    referred: list[Any] = list(refcolumns) if isinstance(refcolumns, (list, tuple)) else [refcolumns]
    if not local or len(local) != len(referred):
        raise ArgumentError(
            "tenant_foreign_key() takes as many referenced columns as columns, at least one each "
            "(without the tenant column, which it adds): "
            'tenant_foreign_key(["project_id"], ["projects.id"]).'
        )
    names = [_name_of(c) for c in local]
    for key in ("ondelete", "onupdate"):
        fk_kwargs[key] = _restricted_action(fk_kwargs.get(key), names)
    return _TenantForeignKeyConstraint(local, referred, **fk_kwargs)


def tenant_unique(*columns: ColumnRef, **kw: Any) -> UniqueConstraint:
    """``UNIQUE (tenant_id, <columns>)``: unique within each tenant, so that a value another tenant
    holds is no error (and no hint) for this one, while a duplicate within a tenant still is::

        __table_args__ = (tenant_unique("email"),)

    The tenant column is the table's own, resolved when the constraint attaches; ``kw`` are
    :class:`~sqlalchemy.schema.UniqueConstraint`'s (``name``, ``deferrable``, ...). Unnamed, it
    is named as PostgreSQL would (``users_tenant_id_email_key``) unless the MetaData's naming
    convention names unique constraints.
    """
    if not columns:
        raise ArgumentError(
            'tenant_unique() needs the columns to make unique per tenant: tenant_unique("email").'
        )
    return _TenantUniqueConstraint(*columns, **kw)


def unique_across_tenants(*columns: ColumnRef, **kw: Any) -> UniqueConstraint:
    """``UNIQUE (<columns>)`` on a tenant-scoped table, unique across all tenants **on purpose**,
    e.g. a login e-mail address in an infrastructure ``users`` table.

    It reveals to a tenant that a value exists in another tenant (its insert fails with a
    duplicate-key error), which is what :func:`unsafe_keys` refuses in every other unique key:
    use it only for values whose existence is not a secret. Only infrastructure tables are kept
    once for everybody; a tenant table has a copy per schema or database tenant, where a value
    "unique across tenants" would not be, so :func:`unsafe_keys` refuses it there.
    """
    if not columns:
        raise ArgumentError('unique_across_tenants() needs columns: unique_across_tenants("email").')
    info = {**kw.pop("info", {}), ACROSS_TENANTS_INFO_KEY: True}
    return UniqueConstraint(*columns, info=info, **kw)


# -- the check ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnsafeKey:
    """A key of a tenant-scoped table that PostgreSQL checks across tenants, and its fix."""

    #: the table's full name (``auth.users``)
    table: str
    #: the key, as SQL (``FOREIGN KEY (project_id) REFERENCES projects (id)``)
    key: str
    #: what it lets a tenant see or do
    problem: str
    #: what to write instead
    fix: str

    def __str__(self) -> str:
        return f"{self.table}: {self.key}: {self.problem}. Fix: {self.fix}"


def unsafe_keys(metadata: MetaData, *, infrastructure_schemas: Iterable[str] = ()) -> list[UnsafeKey]:
    """The keys of ``metadata``'s tenant-scoped tables that cross tenants, each with its fix:

    * a foreign key between two tenant-scoped tables that does not pair their tenant columns;
    * a tenant foreign key whose referenced columns have no unique constraint (PostgreSQL
      refuses it);
    * a unique constraint, unique index or ``unique=True`` column without the tenant column, not
      marked :func:`unique_across_tenants`;
    * :func:`unique_across_tenants` on a table outside ``infrastructure_schemas`` (a tenant
      table has a copy per schema or database tenant: the value would not be unique across them).

    Primary keys are not reported: generated values (sequences, random UUIDs) do not tell a tenant
    anything it could not guess.
    """
    infrastructure = frozenset(infrastructure_schemas)
    findings: list[UnsafeKey] = []
    for table in sorted(metadata.tables.values(), key=lambda t: t.fullname):
        for fk in sorted(table.foreign_key_constraints, key=_describe_fk):
            findings += _foreign_key_findings(fk)
        tenant = tenant_column_name(table)
        if tenant is None:
            continue
        uniques = [c for c in table.constraints if isinstance(c, UniqueConstraint)]
        for constraint in sorted(uniques, key=_describe_unique):
            finding = _unique_finding(table, tenant, constraint, infrastructure)
            if finding is not None:
                findings.append(finding)
        for index in sorted((i for i in table.indexes if i.unique), key=lambda i: str(i.name)):
            finding = _index_finding(table, tenant, index, infrastructure)
            if finding is not None:
                findings.append(finding)
    return findings


def check_tenant_keys(metadata: MetaData, *, infrastructure_schemas: Iterable[str] = ()) -> None:
    """Raise :class:`~sqla_tenancy.UnsafeKeyError` listing :func:`unsafe_keys`, if there are any."""
    findings = unsafe_keys(metadata, infrastructure_schemas=infrastructure_schemas)
    if findings:
        raise UnsafeKeyError(findings)


def _columns_sql(names: Iterable[str]) -> str:
    return ", ".join(names)


def _describe_fk(fk: ForeignKeyConstraint) -> str:
    try:
        target = fk.referred_table.fullname
        referred = [e.column.name for e in fk.elements]
    except (NoReferencedTableError, NoReferencedColumnError):
        target, referred = "?", [str(e.target_fullname) for e in fk.elements]
    local = _columns_sql(e.parent.name for e in fk.elements)
    return f"FOREIGN KEY ({local}) REFERENCES {target} ({_columns_sql(referred)})"


def _describe_unique(constraint: UniqueConstraint) -> str:
    return f"UNIQUE ({_columns_sql(c.name for c in constraint.columns)})"


def _call(function: str, *args: str, **kwargs: Any) -> str:
    rendered = [*args, *(f"{k}={v!r}" for k, v in kwargs.items() if v is not None and v is not False)]
    return f"{function}({', '.join(rendered)})"


def _strings(names: Iterable[str]) -> str:
    return "[" + ", ".join(repr(n) for n in names) + "]"


def _explicit_name(name: Any) -> str | None:
    return str(name) if isinstance(name, str) else None


def _foreign_key_findings(fk: ForeignKeyConstraint) -> list[UnsafeKey]:
    try:
        referred = fk.referred_table
        pairs = [(e.parent, e.column) for e in fk.elements]
    except (NoReferencedTableError, NoReferencedColumnError):
        return []  # SQLAlchemy refuses it when the tables are created
    parent = fk.parent
    assert isinstance(parent, Table)
    local_tenant, referred_tenant = tenant_column_name(parent), tenant_column_name(referred)
    if local_tenant is None or referred_tenant is None:
        return []  # a reference to a global table (or from one): the same rows for every tenant
    if (local_tenant, referred_tenant) not in [(a.name, b.name) for a, b in pairs]:
        others = [(a.name, b.name) for a, b in pairs if a.name != local_tenant]
        fix = _call(
            "tenant_foreign_key",
            _strings(a for a, _ in others),
            _strings(f"{referred.fullname}.{b}" for _, b in others),
            name=_explicit_name(fk.name),
            ondelete=fk.ondelete,
            onupdate=fk.onupdate,
            deferrable=fk.deferrable,
            initially=fk.initially,
            match=fk.match,
        )
        return [
            UnsafeKey(
                parent.fullname,
                _describe_fk(fk),
                "a tenant can attach its rows to another tenant's, learn which ids exist "
                "there, and lose its rows to the other tenant's delete",
                f"declare it as {fix} in the table's arguments (__table_args__), instead of the "
                "ForeignKey on the column or the ForeignKeyConstraint",
            )
        ]
    referred_names = {b.name for _, b in pairs}
    if any(referred_names == key for key in _unique_keys(referred)):
        return []
    wanted = [b.name for _, b in pairs if b.name != referred_tenant]
    return [
        UnsafeKey(
            parent.fullname,
            _describe_fk(fk),
            f"PostgreSQL refuses it: {referred.fullname} has no unique constraint on exactly "
            f"({_columns_sql(sorted(referred_names))})",
            f"add {_call('tenant_unique', *(repr(n) for n in wanted))} to the table arguments of "
            f"{referred.fullname} (TenantScoped models get UNIQUE ({referred_tenant}, <primary "
            "key>) by themselves)",
        )
    ]


def _unique_keys(table: Table) -> list[set[str]]:
    """The column sets a foreign key may reference: the primary key, unique constraints and
    unique indexes on plain columns without a WHERE."""
    keys = [{c.name for c in table.primary_key.columns}]
    keys += [{c.name for c in u.columns} for u in table.constraints if isinstance(u, UniqueConstraint)]
    for index in table.indexes:
        plain = all(isinstance(e, Column) for e in index.expressions)
        if index.unique and plain and index.dialect_kwargs.get("postgresql_where") is None:
            keys.append({c.name for c in index.columns})
    return [k for k in keys if k]


_DISCLOSES = (
    "a tenant inserting a value another tenant holds gets a duplicate-key error, which tells it "
    "the value exists there"
)


def _across_finding(table: Table, key: str, per_tenant_fix: str) -> UnsafeKey:
    return UnsafeKey(
        table.fullname,
        key,
        "marked unique across tenants, but tenant tables are copied into each schema and database "
        "tenant, where a value would not be unique across tenants",
        f"keep values unique across tenants in a table of an infrastructure schema (kept once for "
        f"everybody), or make it unique per tenant: {per_tenant_fix}",
    )


def _unique_finding(
    table: Table, tenant: str, constraint: UniqueConstraint, infrastructure: frozenset[str]
) -> UnsafeKey | None:
    names = [c.name for c in constraint.columns]
    if tenant in names:
        return None
    per_tenant = _call("tenant_unique", *(repr(n) for n in names), name=_explicit_name(constraint.name))
    if constraint.info.get(ACROSS_TENANTS_INFO_KEY):
        if table.schema not in infrastructure:
            return _across_finding(table, _describe_unique(constraint), per_tenant)
        return None
    across = _call("unique_across_tenants", *(repr(n) for n in names))
    column_flag = len(names) == 1 and bool(constraint.columns[0].unique)  # unique=True
    if column_flag:
        key = f"UNIQUE ({names[0]}) (unique=True on the column)"
        fix = f"drop unique=True from column {names[0]} and add {per_tenant} to the table's arguments"
    else:
        key = _describe_unique(constraint)
        fix = f"replace it with {per_tenant}"
    return UnsafeKey(
        table.fullname,
        key,
        _DISCLOSES,
        f"{fix}; if the value must be unique across all tenants and its existence is no secret, "
        f"{across} instead",
    )


def _index_finding(
    table: Table, tenant: str, index: Index, infrastructure: frozenset[str]
) -> UnsafeKey | None:
    expressions = list(index.expressions)
    if any(isinstance(e, Column) and e.name == tenant for e in expressions):
        return None
    sql = [str(e.name) if isinstance(e, Column) else str(e) for e in expressions]
    arguments = [repr(e.name) if isinstance(e, Column) else str(e) for e in expressions]
    per_tenant = f"Index({index.name!r}, {tenant!r}, {', '.join(arguments)}, unique=True)"
    key = f"UNIQUE INDEX {index.name} ({_columns_sql(sql)})"
    if index.info.get(ACROSS_TENANTS_INFO_KEY):
        if table.schema not in infrastructure:
            return _across_finding(table, key, per_tenant)
        return None
    only = expressions[0] if len(expressions) == 1 else None
    if isinstance(only, Column) and only.unique:
        name = only.name
        fix = (
            f"drop unique=True from column {name} (keep index=True if you query it alone) and add "
            f"{_call('tenant_unique', repr(name))} to the table's arguments"
        )
    else:
        fix = f"put the tenant column first: {per_tenant}"
    return UnsafeKey(
        table.fullname,
        key,
        _DISCLOSES,
        f"{fix}; if the value must be unique across all tenants and its existence is no secret, "
        f"add info={{ACROSS_TENANTS_INFO_KEY: True}} to the index instead",
    )


def add_tenant_key(table: Table) -> UniqueConstraint | None:
    """Give a tenant-scoped ``table`` ``UNIQUE (tenant_id, <primary key>)`` (named by
    :func:`tenant_key_name`), the target of tenant foreign keys, unless its primary key or a unique
    constraint already covers exactly those columns. What :class:`TenantScoped` does for each
    table it maps."""
    tenant = tenant_column_name(table)
    primary = [c.name for c in table.primary_key.columns]
    if tenant is None or not primary or tenant in primary:
        return None
    wanted = {tenant, *primary}
    if any(wanted == key for key in _unique_keys(table)):
        return None
    constraint = UniqueConstraint(tenant, *primary, name=tenant_key_name(table.name))
    table.append_constraint(constraint)
    return constraint
