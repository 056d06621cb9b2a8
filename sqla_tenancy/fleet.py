"""Work across tenants: a function per tenant, or one query over every tenant's rows.

Both are platform operations: they take a ``reason``, logged on the ``sqla_tenancy.platform``
logger like :func:`~sqla_tenancy.platform_context`'s.

:func:`for_each_tenant` calls a function once per active tenant, inside that tenant's
:func:`~sqla_tenancy.tenant_context`, on a thread pool: what the function does runs as the
tenant (its role, its binding), so a bug in it cannot touch another tenant's rows.

:func:`query_all_tenants` runs one ``SELECT`` over every active tenant and tags each row with
its tenant. The shared placement's tenants are one query, on the admin engine inside
``platform_context(reason)``: the statement is given its first tenant table's ``tenant_id`` as
the tag, every other tenant table of its ``FROM`` clause is joined on the same tenant, and only
active shared tenants' rows are kept (a ``GROUP BY`` is extended by the tag, so that aggregates
stay per tenant; a ``LIMIT`` applies to the shared tenants' rows together). Each schema or
database tenant is one query, as the tenant. The queries run concurrently, ``concurrency`` at a
time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, Select, Table
from sqlalchemy.engine.result import result_tuple
from sqlalchemy.sql import Executable

from .context import platform_context, tenant_context
from .registry import Tenant
from .rls import tenant_column_name

if TYPE_CHECKING:
    from .services import Services

__all__ = ["TenantResult", "TenantRow", "for_each_tenant", "query_all_tenants", "select_tenants"]

log = logging.getLogger("sqla_tenancy.platform")

_TAG = "_sqla_tenancy_tenant_id"


@dataclass(frozen=True)
class TenantResult:
    """What :func:`for_each_tenant`'s function returned for one tenant, or what it raised."""

    tenant: Tenant
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class TenantRow:
    """One row of :func:`query_all_tenants`, with the tenant it belongs to."""

    tenant: Tenant
    row: Row[Any]


def _check(reason: str, concurrency: int) -> None:
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("Work across tenants needs a non-empty reason, e.g. reason='quarterly report'")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")


def select_tenants(
    services: Services,
    *,
    placements: Iterable[str] | None = None,
    tenants: Iterable[str | uuid.UUID | Tenant] | None = None,
) -> list[Tenant]:
    """The active tenants of ``placements`` (default: every placement), or exactly ``tenants``."""
    if tenants is not None:
        chosen = [services.router.get_tenant(t) for t in tenants]
    else:
        chosen = [t for t in services.registry.all() if t.is_active]
    if placements is not None:
        wanted = set(placements)
        for name in wanted:
            services.placement(name)  # UnknownPlacement for a typo
        chosen = [t for t in chosen if t.strategy in wanted]
    return chosen


def for_each_tenant(
    services: Services,
    fn: Callable[[Tenant], Any],
    *,
    reason: str,
    placements: Iterable[str] | None = None,
    tenants: Iterable[str | uuid.UUID | Tenant] | None = None,
    concurrency: int = 4,
) -> list[TenantResult]:
    """``fn(tenant)`` for each selected tenant, inside its tenant context; one result each, in
    the registry's order (failures are results too: nothing stops the others)."""
    _check(reason, concurrency)
    targets = select_tenants(services, placements=placements, tenants=tenants)
    log.info("for_each_tenant over %d tenant(s): %s", len(targets), reason)

    def one(tenant: Tenant) -> TenantResult:
        try:
            with tenant_context(tenant):
                return TenantResult(tenant, fn(tenant))
        except Exception as error:  # noqa: BLE001 - reported in the result, the others go on
            log.warning("for_each_tenant: tenant %s failed: %r (%s)", tenant.slug, error, reason)
            return TenantResult(tenant, error=error)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sqla-tenancy-fleet") as pool:
        return list(pool.map(one, targets))


def query_all_tenants(
    services: Services,
    statement: Executable,
    *,
    reason: str,
    placements: Iterable[str] | None = None,
    concurrency: int = 4,
) -> list[TenantRow]:
    """The rows ``statement`` (a ``SELECT``) returns for each active tenant, tagged."""
    _check(reason, concurrency)
    if not isinstance(statement, Select):
        raise TypeError("query_all_tenants() takes a select() statement")
    targets = select_tenants(services, placements=placements)
    shared = [t for t in targets if t.strategy == "shared"]
    own = [t for t in targets if t.strategy != "shared"]
    log.info("query_all_tenants over %d tenant(s): %s", len(targets), reason)

    def shared_rows() -> list[TenantRow]:
        tagged = _tagged(statement, [t.id for t in shared])
        by_id = {t.id: t for t in shared}
        with platform_context(reason), services.engines.admin.connect() as conn:
            result = conn.execute(tagged)
            make = result_tuple(list(result.keys())[:-1])
            rows = [TenantRow(by_id[row[-1]], make(tuple(row)[:-1])) for row in result]
            conn.rollback()
        return rows

    def tenant_rows(tenant: Tenant) -> list[TenantRow]:
        with tenant_context(tenant):
            engine = services.router.current().engine(False)
            with engine.connect() as conn:
                rows = [TenantRow(tenant, row) for row in conn.execute(statement)]
                conn.rollback()
        return rows

    jobs: list[Callable[[], list[TenantRow]]] = []
    if shared:
        jobs.append(shared_rows)
    jobs += [lambda t=t: tenant_rows(t) for t in own]  # type: ignore[misc]
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sqla-tenancy-fleet") as pool:
        parts = list(pool.map(lambda job: job(), jobs))
    order = {t.id: i for i, t in enumerate(targets)}
    rows = [row for part in parts for row in part]
    rows.sort(key=lambda r: order[r.tenant.id])  # stable: each tenant's rows keep their order
    return rows


def _tenant_tables(statement: Select[Any]) -> list[tuple[Table, str]]:
    found = []
    for source in statement.get_final_froms():
        for table in _tables_in(source):
            column = tenant_column_name(table)
            if column is not None:
                found.append((table, column))
    return found


def _tables_in(source: Any) -> list[Table]:
    if isinstance(source, Table):
        return [source]
    left, right = getattr(source, "left", None), getattr(source, "right", None)
    if left is not None and right is not None:
        return [*_tables_in(left), *_tables_in(right)]
    return []


def _tagged(statement: Select[Any], tenant_ids: list[uuid.UUID]) -> Select[Any]:
    tables = _tenant_tables(statement)
    if not tables:
        raise ValueError(
            "query_all_tenants() needs the statement to select from a tenant table (one with "
            "tenant_id) to tell the shared tenants' rows apart; pass placements=['schema', "
            "'database'] to query only tenants with tables of their own."
        )
    first, column = tables[0]
    tag = first.c[column]
    tagged = statement.add_columns(tag.label(_TAG)).where(tag.in_(tenant_ids))
    if statement._group_by_clauses:  # an aggregate per group becomes an aggregate per tenant and group
        tagged = tagged.group_by(tag)
    for table, other in tables[1:]:
        tagged = tagged.where(table.c[other] == tag)
    return tagged
