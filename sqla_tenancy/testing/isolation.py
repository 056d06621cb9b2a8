"""The isolation checker: prove, on a real database, that one tenant cannot reach another's rows.

:func:`check_tenant_isolation` creates two throwaway tenants per placement, writes rows for both
into every tenant-scoped table (values made up from the column types, or built by a factory you
register), then acts as tenant A against B's rows through the ORM, Core and raw SQL, and reads the
catalog of every place the tenants' tables live in. It returns an :class:`IsolationReport`;
:func:`assert_tenant_isolation` raises :class:`IsolationError` listing the findings instead.

What it checks, for each placement and each tenant-scoped table:

``see`` / ``count``
    A's ``SELECT`` (ORM query and ``Session.get``, Core, raw SQL, and for schema tenants B's
    schema-qualified table) returns no row whose tenant column is not A's, and ``count(*)`` counts
    A's rows only.
``update`` / ``delete``
    A's ``UPDATE`` and ``DELETE``, aimed at B's primary key and unaimed (no ``WHERE``), touch A's
    own rows only (checked by row counts, inside transactions that are rolled back).
``insert``
    A cannot insert a row carrying B's tenant id, nor move its own row to B.
``unique key`` / ``foreign key``
    A unique constraint or index (the primary key too, unless a sequence or identity fills it)
    does not refuse A a value B holds, and a foreign key does not let A point at B's row:
    PostgreSQL checks keys without row-level security.
``pooled connection``
    Session-level settings A's transaction leaves on a connection (tenant id, search path, role)
    do not reach B's next transaction on that connection.
``no tenant``
    With no tenant (:class:`~sqla_tenancy.no_tenant_context`) the ORM, Core and raw SQL refuse to
    run, and a plain connection of the application role, with no tenant bound, sees no row.
``rls`` / ``policy`` / ``grant``
    In the catalog: row-level security enabled *and forced*, a policy comparing the tenant column
    for each of SELECT, INSERT, UPDATE and DELETE, no permissive policy that does not, and no
    privilege granted to ``PUBLIC`` on the table (or on a schema tenant's schema).

A finding names the model, the operation, the placement, the path taken (``orm``, ``core``,
``sql`` or ``catalog``) and, where rows leaked, the leaked row.

The checker creates tenants and rows and deletes them at the end: run it against a test database
(the pytest plugin's, or a scratch one), never against production.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import logging
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from ..config import plain_url
from ..context import no_tenant_context, tenant_context
from ..errors import TenancyError, TenantRequired
from ..identifiers import quote_ident
from ..models import TenantScoped
from ..registry import Tenant
from ..rls import is_tenant_scoped, qualified_name, tenant_column_name
from ..tenancy import Tenancy

__all__ = [
    "ALL_PLACEMENTS",
    "Finding",
    "IsolationError",
    "IsolationReport",
    "IsolationSetupError",
    "ValueFactory",
    "assert_tenant_isolation",
    "check_tenant_isolation",
]

log = logging.getLogger(__name__)

ALL_PLACEMENTS: tuple[str, ...] = ("shared", "schema", "database")

#: Builds the column values of one row of a model: a callable returning ``{column: value}``, or a
#: factory-boy factory (its ``build()`` is called and the instance's column attributes are read).
ValueFactory = Any

_ROWS_PER_TENANT = 2
_COMMANDS = ("SELECT", "INSERT", "UPDATE", "DELETE")


class IsolationSetupError(TenancyError):
    """The checker could not set up its probe (a column it cannot fill, a placement that is not
    available): nothing was checked for that part."""


@dataclass(frozen=True)
class Finding:
    """One way tenant A reached tenant B's rows (or could have: a catalog finding)."""

    model: str
    operation: str
    placement: str
    via: str
    detail: str
    leaked_row: dict[str, Any] | None = None

    def __str__(self) -> str:
        row = f"; leaked row: {_row_text(self.leaked_row)}" if self.leaked_row else ""
        return f"[{self.placement}] {self.model}: {self.operation} via {self.via}: {self.detail}{row}"


@dataclass
class IsolationReport:
    """What :func:`check_tenant_isolation` found."""

    placements: list[str]
    models: list[str]
    findings: list[Finding] = field(default_factory=list)
    #: how many probes ran
    checks: int = 0
    #: probes that could not run, and why
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def operations(self) -> set[tuple[str, str, str]]:
        """``(placement, model, operation)`` of every finding, for assertions in tests."""
        return {(f.placement, f.model, f.operation) for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "placements": self.placements,
            "models": self.models,
            "checks": self.checks,
            "findings": [asdict(f) for f in self.findings],
            "skipped": self.skipped,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary(self) -> str:
        head = (
            f"{len(self.findings)} isolation finding(s) in {self.checks} checks over "
            f"{len(self.models)} model(s) and placement(s) {', '.join(self.placements)}"
        )
        return "\n".join([head, *(f"  - {f}" for f in self.findings)])

    def raise_for_findings(self) -> None:
        if self.findings:
            raise IsolationError(self)


class IsolationError(AssertionError):
    """Tenant isolation does not hold: the message lists every finding (see ``report``)."""

    def __init__(self, report: IsolationReport) -> None:
        self.report = report
        super().__init__(
            report.summary() + "\nFix each finding (see docs/testing.md, 'The isolation checker'); "
            "tenant tables need row-level security enabled and forced, one tenant policy per "
            "command, keys that include tenant_id and no grants to PUBLIC."
        )


def assert_tenant_isolation(
    tenancy: Tenancy,
    models: Iterable[type[Any] | Table] | None = None,
    placements: Sequence[str] = ALL_PLACEMENTS,
    *,
    factories: Mapping[type[Any] | str, ValueFactory] | None = None,
    tenants: tuple[str | Tenant, str | Tenant] | None = None,
) -> IsolationReport:
    """:func:`check_tenant_isolation`, raising :class:`IsolationError` when anything is found."""
    report = check_tenant_isolation(tenancy, models, placements, factories=factories, tenants=tenants)
    report.raise_for_findings()
    return report


def check_tenant_isolation(
    tenancy: Tenancy,
    models: Iterable[type[Any] | Table] | None = None,
    placements: Sequence[str] = ALL_PLACEMENTS,
    *,
    factories: Mapping[type[Any] | str, ValueFactory] | None = None,
    tenants: tuple[str | Tenant, str | Tenant] | None = None,
) -> IsolationReport:
    """Check that tenants cannot reach each other's rows; see the module documentation.

    :param tenancy: an installed :class:`~sqla_tenancy.Tenancy` on a test database (the database
        placement also needs :meth:`~sqla_tenancy.Tenancy.prepare_server`).
    :param models: the models (or Core tables) to probe; default: every tenant-scoped table of the
        tenancy's metadata.
    :param placements: the placements to create the two tenants in.
    :param factories: row builders by model class or table name (``"auth.users"``), used instead
        of values made up from the column types.
    :param tenants: two existing tenants of one placement to probe instead of creating a pair
        per placement (``placements`` is then ignored). The checker's rows stay in them.
    """
    checker = _Checker(tenancy, models, factories or {})
    if tenants is not None:
        pair = (tenancy.get_tenant(tenants[0]), tenancy.get_tenant(tenants[1]))
        if pair[0].strategy != pair[1].strategy:
            raise IsolationSetupError(
                f"tenants={tenants!r}: give two tenants of one placement "
                f"(not {pair[0].strategy} and {pair[1].strategy})."
            )
        report = IsolationReport([pair[0].strategy], [t.fullname for t in checker.targets])
        checker.run(pair[0].strategy, report, pair)
        return report
    report = IsolationReport(list(placements), [t.fullname for t in checker.targets])
    for placement in placements:
        checker.run(placement, report)
    return report


# -- values ---------------------------------------------------------------------------------------


def _row_text(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in row.items())


def _made_up_value(column: Any, tag: str, n: int) -> Any:
    """A value of ``column``'s type, distinct for each ``(tag, n)``."""
    kind = column.type
    if isinstance(kind, sqltypes.Enum):
        choices = list(kind.enums)
        if kind.enum_class is not None:
            return next(iter(kind.enum_class))
        return choices[0]
    if isinstance(kind, sqltypes.Boolean):
        return n % 2 == 0
    if isinstance(kind, sqltypes.String):  # Text, Unicode, VARCHAR ...
        value = f"iso-{tag}-{n}-{secrets.token_hex(3)}"
        length = getattr(kind, "length", None)
        return value[-length:] if length else value
    if isinstance(kind, sqltypes.Integer):
        limit = 30000 if isinstance(kind, sqltypes.SmallInteger) else 2_000_000_000
        return secrets.randbelow(limit) + 1
    if isinstance(kind, sqltypes.Numeric):
        return decimal.Decimal(secrets.randbelow(9000) + 1) / 100 if kind.asdecimal else float(n) + 0.5
    if isinstance(kind, sqltypes.DateTime):
        return dt.datetime.now(dt.timezone.utc) if kind.timezone else dt.datetime.now()
    if isinstance(kind, sqltypes.Date):
        return dt.date.today()
    if isinstance(kind, sqltypes.Time):
        return dt.time(12, n % 60)
    if isinstance(kind, sqltypes.Interval):
        return dt.timedelta(minutes=n + 1)
    if isinstance(kind, sqltypes.Uuid):
        return uuid.uuid4() if kind.as_uuid else str(uuid.uuid4())
    if isinstance(kind, sqltypes.JSON):
        return {"sqla_tenancy_check": tag, "n": n}
    if isinstance(kind, sqltypes.LargeBinary):
        return secrets.token_bytes(8)
    if isinstance(kind, sqltypes.ARRAY):
        return []
    if column.nullable:
        return None
    raise IsolationSetupError(
        f"The isolation checker cannot make up a value for {column.table.fullname}.{column.name} "
        f"({kind!r}): pass factories={{<model>: <factory or callable returning a dict>}}."
    )


def _factory_values(factory: ValueFactory, table: Table) -> dict[str, Any]:
    if hasattr(factory, "_meta") and hasattr(factory, "build"):  # a factory-boy factory
        instance = factory.build()
        from sqlalchemy import inspect as sa_inspect

        mapper = sa_inspect(type(instance))
        values = {}
        for prop in mapper.column_attrs:
            for column in prop.columns:
                if isinstance(column, type(table.c[0])) and column.table is table:
                    value = getattr(instance, prop.key, None)
                    if value is not None:
                        values[column.name] = value
        return values
    built = factory()
    if not isinstance(built, Mapping):
        raise IsolationSetupError(
            f"The factory registered for {table.fullname} returned {type(built).__name__}: it must "
            "return a mapping of column names to values (or be a factory-boy factory)."
        )
    return dict(built)


def _tenant_column(table: Table) -> str:
    """The tenant column of a tenant-scoped table (the checker probes no other)."""
    name = tenant_column_name(table)
    assert name is not None, table.fullname
    return name


def _has_default(column: Any) -> bool:
    return column.server_default is not None or column.default is not None


def _mapped_classes(tables: Iterable[Table]) -> dict[Table, type[Any]]:
    """The ORM class of each table, found among the subclasses of :class:`TenantScoped`."""
    wanted = set(tables)
    found: dict[Table, type[Any]] = {}
    stack: list[type[Any]] = list(TenantScoped.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        table = getattr(cls, "__table__", None)
        if isinstance(table, Table) and table in wanted and table not in found:
            found[table] = cls
    return found


# -- the checker ----------------------------------------------------------------------------------


@dataclass
class _Seeded:
    tenant: Tenant
    #: rows by table, as the database returned them
    rows: dict[Table, list[dict[str, Any]]]


class _Checker:
    def __init__(
        self,
        tenancy: Tenancy,
        models: Iterable[type[Any] | Table] | None,
        factories: Mapping[type[Any] | str, ValueFactory],
    ) -> None:
        self.tenancy = tenancy
        metadata_tables = [t for t in tenancy.metadata.sorted_tables if is_tenant_scoped(t)]
        classes: dict[Table, type[Any]] = {}
        if models is None:
            targets = metadata_tables
        else:
            targets = []
            for model in models:
                table = model if isinstance(model, Table) else getattr(model, "__table__", None)
                if not isinstance(table, Table) or table not in metadata_tables:
                    raise IsolationSetupError(
                        f"{model!r} is not a tenant-scoped table of this Tenancy's metadata: give "
                        "TenantScoped models (or Core tables with tenant_id_column())."
                    )
                targets.append(table)
                if not isinstance(model, Table):
                    classes[table] = model
        self.targets = targets
        self.seed_tables = metadata_tables  # parents are seeded too, for foreign keys
        self.classes = {**_mapped_classes(targets), **classes}
        self.factories: dict[Table, ValueFactory] = {}
        for key, factory in factories.items():
            table = (
                tenancy.metadata.tables.get(key) if isinstance(key, str) else getattr(key, "__table__", None)
            )
            if not isinstance(table, Table):
                raise IsolationSetupError(f"factories: {key!r} names no table of this Tenancy's metadata.")
            self.factories[table] = factory
        self.Session = tenancy.sessionmaker()
        self.checks = 0

    # -- set-up -------------------------------------------------------------------------------

    def _values(
        self, table: Table, tag: str, n: int, parents: Mapping[Table, list[dict[str, Any]]]
    ) -> dict[str, Any]:
        tenant_column = _tenant_column(table)
        given = _factory_values(self.factories[table], table) if table in self.factories else {}
        fk_columns: dict[str, Any] = {}
        for fk in table.foreign_key_constraints:
            referred = fk.referred_table
            pool = parents.get(referred)
            if not pool:
                continue
            parent = pool[n % len(pool)]
            for element in fk.elements:
                if element.parent.name != tenant_column:
                    fk_columns[element.parent.name] = parent[element.column.name]
        values: dict[str, Any] = {}
        for column in table.columns:
            name = column.name
            if name == tenant_column or column.computed is not None or column.identity is not None:
                continue
            if name in fk_columns:
                values[name] = fk_columns[name]
            elif name in given:
                values[name] = given[name]
            elif column is table.autoincrement_column or _has_default(column):
                continue
            elif column.foreign_keys:
                if not column.nullable:
                    raise IsolationSetupError(
                        f"{table.fullname}.{name} references a table the checker has no rows of: "
                        "register a factory for the model."
                    )
            else:
                values[name] = _made_up_value(column, tag, n)
        return values

    def _seed(self, tenant: Tenant, tag: str) -> _Seeded:
        rows: dict[Table, list[dict[str, Any]]] = {}
        with tenant_context(tenant), self.tenancy.connect() as conn, conn.begin():
            for table in self.seed_tables:
                made = []
                for n in range(_ROWS_PER_TENANT):
                    values = self._values(table, tag, n, rows)
                    row = conn.execute(insert(table).values(**values).returning(*table.c)).one()
                    made.append(dict(row._mapping))
                rows[table] = made
        return _Seeded(tenant, rows)

    @contextmanager
    def _tenants(
        self, placement: str, given: tuple[Tenant, Tenant] | None
    ) -> Iterator[tuple[_Seeded, _Seeded]]:
        if given is not None:
            yield self._seed(given[0], f"{placement}-a"), self._seed(given[1], f"{placement}-b")
            return
        stem = f"isocheck_{secrets.token_hex(3)}"
        made: list[Tenant] = []
        try:
            for side in ("a", "b"):
                try:
                    made.append(self.tenancy.create_tenant(f"{stem}_{side}", placement=placement))
                except TenancyError as exc:
                    raise IsolationSetupError(
                        f"The isolation checker could not create a {placement} tenant: {exc}"
                    ) from exc
            a = self._seed(made[0], f"{placement}-a")
            b = self._seed(made[1], f"{placement}-b")
            yield a, b
        finally:
            for tenant in reversed(made):
                try:
                    self.tenancy.delete_tenant(tenant.slug)
                except (TenancyError, SQLAlchemyError):
                    log.exception("the isolation checker could not delete its tenant %s", tenant.slug)

    # -- running ------------------------------------------------------------------------------

    def run(
        self, placement: str, report: IsolationReport, given: tuple[Tenant, Tenant] | None = None
    ) -> None:
        self.report = report
        self.placement = placement
        self.schemas_seen: set[str] = set()
        with self._tenants(placement, given) as (a, b):
            for table in self.targets:
                self.table = table
                self._see_and_count(table, a, b)
                self._mutations(table, a, b)
                self._keys(table, a, b)
                self._catalog(table, a, b)
            self._pooled_connection(a, b)
            self._no_tenant(a, b)
        report.checks = self.checks

    def _find(self, operation: str, via: str, detail: str, row: Any = None) -> None:
        self.report.findings.append(
            Finding(self.table.fullname, operation, self.placement, via, detail, dict(row) if row else None)
        )

    def _skip(self, why: str) -> None:
        self.report.skipped.append(f"[{self.placement}] {self.table.fullname}: {why}")

    def _foreign(self, rows: Iterable[Any], a: _Seeded) -> list[dict[str, Any]]:
        column = _tenant_column(self.table)
        return [dict(r) for r in rows if r[column] != a.tenant.id]

    @contextmanager
    def _as(self, seeded: _Seeded) -> Iterator[Connection]:
        """A Core connection bound to ``seeded``'s tenant, in a transaction rolled back at the end."""
        with tenant_context(seeded.tenant), self.tenancy.connect() as conn:
            trans = conn.begin()
            try:
                yield conn
            finally:
                trans.rollback()

    @contextmanager
    def _orm(self, seeded: _Seeded) -> Iterator[Session]:
        with tenant_context(seeded.tenant), self.Session() as session:
            try:
                yield session
            finally:
                session.rollback()

    def _probe(self, conn: Connection, statement: Any, run: Callable[[Any], Any] | None = None) -> Any:
        """Run one statement (with ``run``, default ``conn.execute``) in a savepoint of ``conn``'s
        transaction; a refusal by the database, which is what isolation looks like for writes, is
        returned as the exception."""
        self.checks += 1
        savepoint = conn.begin_nested()
        try:
            result = (run or conn.execute)(statement)
        except DBAPIError as exc:
            savepoint.rollback()
            return exc
        savepoint.rollback()
        return result

    def _pk_where(self, table: Table, row: Mapping[str, Any]) -> Any:
        return [c == row[c.name] for c in table.primary_key.columns]

    # see / count ----------------------------------------------------------------------------

    def _see_and_count(self, table: Table, a: _Seeded, b: _Seeded) -> None:
        column = _tenant_column(table)
        own = len(a.rows[table])
        target = b.rows[table][0]
        model = self.classes.get(table)
        if model is not None:
            with self._orm(a) as session:
                self.checks += 3
                objects = session.scalars(select(model)).all()
                rows = [{c.name: getattr(o, c.key) for c in table.columns} for o in objects]
                for row in self._foreign(rows, a):
                    self._find("see", "orm", "an ORM query of A returned B's row", row)
                    break
                pk = tuple(target[c.name] for c in table.primary_key.columns)
                got = session.get(model, pk if len(pk) > 1 else pk[0])
                if got is not None and getattr(got, column) != a.tenant.id:
                    self._find("see", "orm", "Session.get() with B's primary key returned B's row", target)
                count = session.scalar(select(func.count()).select_from(model))
                if count != own:
                    self._find("count", "orm", f"A counts {count} rows, it has {own}")
        else:
            self._skip("no ORM class found (a Core table, or not a TenantScoped model): ORM probes skipped")
        with self._as(a) as conn:
            self.checks += 4
            for row in self._foreign(conn.execute(select(table)).mappings(), a):
                self._find("see", "core", "a Core select of A returned B's row", row)
                break
            count = conn.execute(select(func.count()).select_from(table)).scalar()
            if count != own:
                self._find("count", "core", f"A counts {count} rows, it has {own}")
            for row in self._foreign(
                conn.execute(text(f"SELECT * FROM {qualified_name(table)}")).mappings(), a
            ):
                self._find("see", "sql", "raw SQL of A returned B's row", row)
                break
            count = conn.execute(text(f"SELECT count(*) FROM {qualified_name(table)}")).scalar()
            if count != own:
                self._find("count", "sql", f"A counts {count} rows, it has {own}")
            b_place = self._location_schema(b.tenant, table)
            if b_place is not None:
                name = f"{quote_ident(b_place)}.{quote_ident(table.name)}"
                got = self._probe(conn, text(f"SELECT * FROM {name}"))
                if not isinstance(got, Exception):
                    for row in self._foreign(got.mappings().all(), a):
                        self._find("see", "sql", f"A read B's schema-qualified table {name}", row)
                        break

    def _location_schema(self, tenant: Tenant, table: Table) -> str | None:
        """B's own schema for a schema tenant's tenant table (what A would qualify names with)."""
        if table.schema is not None:
            return None
        target = self.tenancy.placement(tenant.strategy).dump_target(tenant)
        if target is None or target[1] == "public":
            return None
        return target[1]

    # update / delete / insert ---------------------------------------------------------------

    def _updatable(self, table: Table) -> Any:
        tenant = _tenant_column(table)
        for column in table.columns:
            if (
                column.name != tenant
                and not column.primary_key
                and not column.foreign_keys
                and column.computed is None
                and not isinstance(column.type, (sqltypes.ARRAY, sqltypes.JSON))
            ):
                try:
                    _made_up_value(column, "u", 0)
                except IsolationSetupError:
                    continue
                return column
        return None

    def _mutations(self, table: Table, a: _Seeded, b: _Seeded) -> None:
        stmt: Any
        own = a.rows[table]
        target = b.rows[table][0]
        pk_cols = list(table.primary_key.columns)
        a_keys = {tuple(r[c.name] for c in pk_cols) for r in own}
        aimed_expected = 1 if tuple(target[c.name] for c in pk_cols) in a_keys else 0
        column = self._updatable(table)
        tenant_col = table.c[_tenant_column(table)]
        model = self.classes.get(table)
        where = self._pk_where(table, target)
        sql_where = " AND ".join(f"{quote_ident(c.name)} = :k{i}" for i, c in enumerate(pk_cols))
        sql_keys = {f"k{i}": target[c.name] for i, c in enumerate(pk_cols)}
        name = qualified_name(table)

        def touched(op: str, via: str, result: Any, expected: int, aimed: bool) -> None:
            if isinstance(result, Exception):
                return
            if result.rowcount > expected:
                what = "aimed at B's primary key" if aimed else "with no WHERE"
                self._find(
                    op,
                    via,
                    f"A's {op.upper()} {what} affected {result.rowcount} rows, A has {expected}",
                    target if aimed else None,
                )

        with self._as(a) as conn:
            if column is not None:
                new = _made_up_value(column, "hacked", 0)
                for via, stmt in (
                    ("core", update(table).where(*where).values({column.name: new})),
                    (
                        "sql",
                        text(
                            f"UPDATE {name} SET {quote_ident(column.name)} = :v WHERE {sql_where}"
                        ).bindparams(v=new, **sql_keys),
                    ),
                ):
                    touched(
                        "update",
                        via,
                        self._probe(conn, stmt),
                        aimed_expected,
                        True,
                    )
                stmt = text(f"UPDATE {name} SET {quote_ident(column.name)} = {quote_ident(column.name)}")
                touched(
                    "update",
                    "sql",
                    self._probe(conn, stmt),
                    len(own),
                    False,
                )
            else:
                self._skip("no column the checker can update: UPDATE probes skipped")
            for via, stmt in (
                ("core", delete(table).where(*where)),
                ("sql", text(f"DELETE FROM {name} WHERE {sql_where}").bindparams(**sql_keys)),
            ):
                touched(
                    "delete",
                    via,
                    self._probe(conn, stmt),
                    aimed_expected,
                    True,
                )
            stmt = text(f"DELETE FROM {name}")
            touched(
                "delete",
                "sql",
                self._probe(conn, stmt),
                len(own),
                False,
            )
            # insert a row carrying B's tenant id; move an own row to B
            values = self._values(table, f"{self.placement}-x", 0, a.rows)
            values[tenant_col.name] = b.tenant.id
            for via, stmt in (("core", insert(table).values(**values)),):
                got = self._probe(conn, stmt)
                if not isinstance(got, Exception):
                    self._find("insert", via, "A inserted a row carrying B's tenant id", values)
            columns = ", ".join(quote_ident(k) for k in values)
            params = ", ".join(f":{k}" for k in values)
            stmt = text(f"INSERT INTO {name} ({columns}) VALUES ({params})").bindparams(**values)
            if not isinstance(self._probe(conn, stmt), Exception):
                self._find("insert", "sql", "A inserted a row carrying B's tenant id", values)
            mine = self._pk_where(table, own[0])
            stmt = update(table).where(*mine).values({tenant_col.name: b.tenant.id})
            got = self._probe(conn, stmt)
            if not isinstance(got, Exception) and got.rowcount:
                self._find("insert", "core", "A moved its own row to B (UPDATE SET tenant_id = B)", own[0])
        if model is None:
            return
        with self._orm(a) as session:
            conn = session.connection()
            if column is not None:
                new = _made_up_value(column, "hacked", 1)
                stmt = (
                    update(model)
                    .where(*where)
                    .values({column.key: new})
                    .execution_options(synchronize_session=False)
                )
                touched(
                    "update",
                    "orm",
                    self._probe(conn, stmt, session.execute),
                    aimed_expected,
                    True,
                )
            stmt = delete(model).where(*where).execution_options(synchronize_session=False)
            touched(
                "delete",
                "orm",
                self._probe(conn, stmt, session.execute),
                aimed_expected,
                True,
            )

            def add() -> None:
                obj = model(**{table.c[k].key: v for k, v in values.items()})
                session.add(obj)
                session.flush()
                session.expunge(obj)

            self.checks += 1
            savepoint = session.begin_nested()
            try:
                add()
            except DBAPIError:
                savepoint.rollback()
            else:
                savepoint.rollback()
                self._find("insert", "orm", "A flushed a new object carrying B's tenant id", values)

    # keys -----------------------------------------------------------------------------------

    def _constraints(self, conn: Connection, table: Table) -> list[tuple[str, str, list[str], bool]]:
        """``(name, kind 'u' | 'f', columns, filled by a sequence)`` of the table as A's
        transaction resolves its name: unique constraints, unique indexes and foreign keys."""
        rows = conn.execute(
            text(
                """
                select c.relname, 'u', array(select a.attname from unnest(i.indkey) k
                        join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k),
                       bool_and(coalesce(a2.attidentity <> '' or pg_get_expr(d.adbin, d.adrelid)
                                 like 'nextval(%', false))
                from pg_index i join pg_class c on c.oid = i.indexrelid
                join lateral unnest(i.indkey) k2 on true
                left join pg_attribute a2 on a2.attrelid = i.indrelid and a2.attnum = k2
                left join pg_attrdef d on d.adrelid = i.indrelid and d.adnum = k2
                where i.indrelid = cast(:t as regclass) and i.indisunique and i.indexprs is null
                  and i.indpred is null
                group by c.relname, i.indkey, i.indrelid
                union all
                select conname, 'f', array(select a.attname from unnest(conkey) k
                        join pg_attribute a on a.attrelid = conrelid and a.attnum = k), false
                from pg_constraint where conrelid = cast(:t as regclass) and contype = 'f'
                """
            ),
            {"t": qualified_name(table)},
        ).all()
        return [(r[0], r[1], list(r[2]), bool(r[3])) for r in rows]

    def _keys(self, table: Table, a: _Seeded, b: _Seeded) -> None:
        tenant = _tenant_column(table)
        source = b.rows[table][0]
        with self._as(a) as conn:
            if table.schema is not None:  # infrastructure: the main database's table holds the keys
                with self.tenancy.admin_engine.connect() as admin:
                    constraints = self._constraints(admin, table)
            else:
                constraints = self._constraints(conn, table)
            for name, kind, columns, generated in constraints:
                if kind == "u" and (tenant in columns or generated):
                    continue  # per tenant by construction; sequence-filled keys are exempt
                copied = [c for c in columns if c != tenant]
                values = self._values(table, f"{self.placement}-k", 1, a.rows)
                for c in copied:
                    values[c] = source[c]
                if kind == "f":
                    fk = next(
                        (
                            f
                            for f in table.foreign_key_constraints
                            if {e.parent.name for e in f.elements} - {tenant} == set(copied)
                        ),
                        None,
                    )
                    if fk is not None and self._a_has_parent(a, fk, source, tenant):
                        self._skip(f"foreign key {name}: A holds a parent with B's key values; not probed")
                        continue
                stmt = insert(table).values(**values)
                got = self._probe(conn, stmt)
                state = getattr(getattr(got, "orig", None), "sqlstate", None)
                if kind == "u" and state == "23505":
                    self._find(
                        "unique key",
                        "sql",
                        f"{name} ({', '.join(columns)}) refused A a value B holds: the key "
                        f"crosses tenants (add {tenant}: tenant_unique())",
                        {c: source[c] for c in copied},
                    )
                if kind == "f" and not isinstance(got, Exception):
                    self._find(
                        "foreign key",
                        "sql",
                        f"{name} ({', '.join(columns)}) let A's row reference B's row (make it "
                        "tenant_foreign_key())",
                        {c: source[c] for c in copied},
                    )

    def _a_has_parent(self, a: _Seeded, fk: Any, source: Mapping[str, Any], tenant: str | None) -> bool:
        parents = a.rows.get(fk.referred_table, [])
        pairs = [(e.parent.name, e.column.name) for e in fk.elements if e.parent.name != tenant]
        return any(all(p[ref] == source[col] for col, ref in pairs) for p in parents)

    # catalog --------------------------------------------------------------------------------

    @contextmanager
    def _admin_at(self, tenant: Tenant, table: Table) -> Iterator[tuple[Connection, str]]:
        """An admin connection where ``tenant``'s ``table`` lives, and its qualified name there."""
        target = (
            None if table.schema is not None else self.tenancy.placement(tenant.strategy).dump_target(tenant)
        )
        if target is None:
            with self.tenancy.admin_engine.connect() as conn:
                yield conn, qualified_name(table)
            return
        url, schema = target
        if url.database == self.tenancy.admin_url.database and url.host == self.tenancy.admin_url.host:
            with self.tenancy.admin_engine.connect() as conn:
                yield conn, f"{quote_ident(schema)}.{quote_ident(table.name)}"
            return
        engine: Engine = create_engine(plain_url(url), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                yield conn, f"{quote_ident(schema)}.{quote_ident(table.name)}"
        finally:
            engine.dispose()

    def _catalog(self, table: Table, a: _Seeded, b: _Seeded) -> None:
        seen: set[tuple[str | None, str]] = set()
        for tenant in (a.tenant, b.tenant):
            with self._admin_at(tenant, table) as (conn, name):
                where = (conn.engine.url.database, name)
                if where in seen:
                    continue
                seen.add(where)
                self._catalog_at(conn, table, name, tenant)

    def _catalog_at(self, conn: Connection, table: Table, name: str, tenant: Tenant) -> None:
        column = _tenant_column(table)
        place = name if name == qualified_name(table) else f"{name} (tenant {tenant.slug})"
        self.checks += 4
        row = conn.execute(
            text(
                "select relrowsecurity, relforcerowsecurity, relacl::text[] from pg_class "
                "where oid = cast(:t as regclass)"
            ),
            {"t": name},
        ).one()
        if not row[0]:
            self._find(
                "rls",
                "catalog",
                f"row-level security is not enabled on {place}: every tenant "
                "sees every row (ALTER TABLE ... ENABLE ROW LEVEL SECURITY, or Tenancy.install())",
            )
        if not row[1]:
            self._find(
                "rls",
                "catalog",
                f"row-level security is enabled but not forced on {place}: the "
                "table's owner bypasses it (ALTER TABLE ... FORCE ROW LEVEL SECURITY)",
            )
        for entry in row[2] or []:
            grantee, _, rest = entry.partition("=")
            if grantee == "" and rest.split("/")[0]:
                self._find(
                    "grant",
                    "catalog",
                    f"{place} grants {rest.split('/')[0]!r} to PUBLIC: every "
                    f"role, other tenants' included, may use it (REVOKE ALL ON {name} FROM PUBLIC)",
                )
        policies = conn.execute(
            text(
                "select polname, polcmd, polpermissive, coalesce(pg_get_expr(polqual, polrelid), ''), "
                "coalesce(pg_get_expr(polwithcheck, polrelid), '') from pg_policy "
                "where polrelid = cast(:t as regclass)"
            ),
            {"t": name},
        ).all()
        commands = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}
        covered: set[str] = set()
        for polname, cmd, permissive, qual, check in policies:
            command = commands.get(cmd, cmd)
            guards = [e for e in (qual, check) if e]
            compares = bool(guards) and all("current_tenant_id()" in e and str(column) in e for e in guards)
            if permissive and not compares:
                self._find(
                    "policy",
                    "catalog",
                    f"permissive policy {polname!r} ({command}) on {place} does "
                    f"not compare {column} with the tenant (USING {qual or '-'} WITH CHECK "
                    f"{check or '-'}): policies are OR-ed, so it opens the table to every tenant",
                )
            if compares:
                covered |= set(_COMMANDS) if command == "ALL" else {command}
        for command in _COMMANDS:
            if command not in covered:
                self._find(
                    "policy",
                    "catalog",
                    f"no tenant policy for {command} on {place}: the command "
                    "is refused for every tenant, or allowed by another policy to all of them "
                    "(Tenancy.install() creates one per command)",
                )
        if table.schema is None:
            schema = name.split(".")[0].strip('"') if "." in name else None
            if schema is not None and schema != "public" and schema not in self.schemas_seen:
                self.schemas_seen.add(schema)
                acl = conn.execute(
                    text("select nspacl::text[] from pg_namespace where nspname = :s"), {"s": schema}
                ).scalar()
                for entry in acl or []:
                    grantee, _, rest = entry.partition("=")
                    if grantee == "" and rest.split("/")[0]:
                        self._find(
                            "grant",
                            "catalog",
                            f"schema {schema} grants {rest.split('/')[0]!r} to "
                            f"PUBLIC (REVOKE ALL ON SCHEMA {quote_ident(schema)} FROM PUBLIC)",
                        )

    # pooled connections and no tenant -------------------------------------------------------

    def _pooled_connection(self, a: _Seeded, b: _Seeded) -> None:
        self.table = self.targets[0] if self.targets else self.seed_tables[0]
        engine_a = self.tenancy.placement(a.tenant.strategy).engine(a.tenant, async_=False)
        engine_b = self.tenancy.placement(b.tenant.strategy).engine(b.tenant, async_=False)
        if engine_a is not engine_b:
            self.report.skipped.append(
                f"[{self.placement}] pooled connection: each tenant has a pool of its own; not probed"
            )
            return
        size = max(engine_a.pool.checkedin(), 0) + 1  # type: ignore[attr-defined]
        with tenant_context(a.tenant):
            held = [self.tenancy.connect() for _ in range(size)]
            for conn in held:
                with conn.begin():
                    for setting in ("app.current_tenant_id", "search_path", "role"):
                        try:
                            with conn.begin_nested():
                                conn.execute(
                                    text("select set_config(:n, current_setting(:n), false)"), {"n": setting}
                                )
                        except DBAPIError:
                            pass
            for conn in held:
                conn.close()
        with tenant_context(b.tenant):
            held = [self.tenancy.connect() for _ in range(size)]
            try:
                for conn in held:
                    with conn.begin():
                        self.checks += 1
                        bound = conn.execute(
                            text("select current_setting('app.current_tenant_id', true)")
                        ).scalar()
                        if bound != str(b.tenant.id):
                            self._find(
                                "pooled connection",
                                "sql",
                                f"B's transaction runs with tenant id {bound!r} left by A's on the same "
                                "connection",
                            )
                        for table in self.targets:
                            self.table = table
                            column = _tenant_column(table)
                            stmt = text(
                                f"SELECT * FROM {qualified_name(table)} WHERE {quote_ident(column)} = :a"
                            ).bindparams(a=a.tenant.id)
                            got = self._probe(conn, stmt)  # refused (an error) is closed too
                            leaked = None if isinstance(got, Exception) else got.mappings().first()
                            if leaked is not None:
                                self._find(
                                    "pooled connection",
                                    "sql",
                                    "B's transaction on a connection A used sees A's rows",
                                    leaked,
                                )
            finally:
                for conn in held:
                    with contextlib.suppress(DBAPIError), conn.begin():
                        conn.exec_driver_sql("RESET ALL")  # leave the pool as it was found
                    conn.close()

    def _no_tenant(self, a: _Seeded, b: _Seeded) -> None:
        for table in self.targets:
            self.table = table
            model = self.classes.get(table)
            attempts: list[tuple[str, Callable[[Any], list[dict[str, Any]]], Any]] = [
                ("core", self._run_core, select(table)),
                ("sql", self._run_core, text(f"SELECT * FROM {qualified_name(table)}")),
            ]
            if model is not None:
                attempts.insert(0, ("orm", self._run_orm, model))
            for via, attempt, target in attempts:
                self.checks += 1
                with no_tenant_context("the isolation checker runs this outside any tenant"):
                    try:
                        rows = attempt(target)
                    except TenantRequired:
                        continue
                self._find(
                    "no tenant",
                    via,
                    "a query with no tenant ran instead of raising TenantRequired",
                    rows[0] if rows else None,
                )
            if table.schema is not None or self.placement == "shared":
                self._unbound_connection(table)

    def _run_core(self, stmt: Any) -> list[dict[str, Any]]:
        with self.tenancy.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def _run_orm(self, model: type[Any]) -> list[dict[str, Any]]:
        with self.Session() as session:
            return [{"object": repr(o)} for o in session.scalars(select(model))]

    def _unbound_connection(self, table: Table) -> None:
        """The application role on a plain connection, no tenant bound: RLS must show nothing."""
        self.checks += 1
        engine = create_engine(plain_url(self.tenancy.url), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                try:
                    row = (
                        conn.execute(text(f"SELECT * FROM {qualified_name(table)} LIMIT 1"))
                        .mappings()
                        .first()
                    )
                except DBAPIError:
                    return  # refused: closed
        finally:
            engine.dispose()
        if row is not None:
            self._find("no tenant", "sql", "the application role, with no tenant bound, reads rows", row)
