"""Moving a tenant to another placement: copy, verify, switch, remove the source.

Supported: between the ``shared`` and ``schema`` placements, whose storage is in the main
database, so that the copy, the checks, the registry switch and the removal of the source are
**one transaction**: a failure at any step (the tests fail each in turn) rolls it back, and the
tenant stays active where it was, with all its rows.

1. *Read-only.* From the start until the switch commits, the tenant's writes to its tenant
   tables are refused and its reads served: a shared tenant's by a RESTRICTIVE policy per shared
   table that refuses writes of its rows (created, committed and waited in before the copy, and
   dropped with the switch, or after a failure); a schema tenant's by ``LOCK TABLE ... IN
   EXCLUSIVE MODE`` on its tables for the move's transaction (its writes wait for the move).
2. *Provision* the target (the placement's own provisioning, in the move's transaction).
3. *Copy* each tenant table's rows, parents first (``INSERT ... OVERRIDING SYSTEM VALUE SELECT``),
   and bring the target's sequences past the copied keys.
4. *Verify* per table: the row count and an MD5 over the rows' text, source against target.
5. *Remove the source* (the shared tables' rows of the tenant, or its schema and roles) and
   *switch* the registry row; commit. Infrastructure rows stay where they are, in the main
   database, for every placement.

A schema tenant's keys come from its own sequences; moved into shared tables, they may collide
with another tenant's: the copy then fails on the primary key and nothing changes (the error
says which table). Moves to or from the ``database`` placement are not supported yet
(:class:`~sqla_tenancy.UnsupportedOperation`): its provisioning is journaled in the registry row of
a tenant being provisioned, and its role names are those of a schema tenant.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table, text

from . import locks
from .context import platform_context
from .errors import ProvisioningError, TenancyError, UnsupportedOperation
from .identifiers import quote_ident, quote_literal
from .registry import Tenant
from .rls import qualified_name, tenant_column_name

if TYPE_CHECKING:
    from .services import Services

__all__ = ["MOVABLE", "MoveError", "move_tenant"]

log = logging.getLogger("sqla_tenancy.lifecycle")

#: The placements a tenant can be moved between.
MOVABLE = frozenset({"shared", "schema"})


class MoveError(ProvisioningError):
    """A move failed; the tenant is active at its source, with every row (nothing was changed)."""


def _policy_name(tenant: Tenant) -> str:
    return f"tenancy_moving_{tenant.id.hex}"


def move_tenant(services: Services, tenant: Tenant, placement: str, *, server: str | None) -> Tenant:
    """Move ``tenant`` to ``placement``; the tenant as the registry has it afterwards."""
    _check(services, tenant, placement, server)
    target_placement = services.placement(placement)
    steps = services.steps
    config = services.config
    tables = [t for t in config.metadata.sorted_tables if t in config.tenant_tables()]
    blocked = False
    try:
        if tenant.strategy == "shared":
            steps("move_read_only")
            _block_shared_writes(services, tenant, tables)
            blocked = True
        # platform_context: the audit trail records the move's writes with this reason
        with (
            platform_context(f"move tenant {tenant.slug} to {placement}"),
            services.engines.admin.begin() as admin,
        ):
            admin.execute(text(locks.XACT_LOCK), {"key": locks.tenant_key(tenant.slug)})
            if tenant.strategy == "schema":
                steps("move_read_only")
                for table in tables:
                    admin.exec_driver_sql(f"LOCK TABLE {_qualified(tenant, table)} IN EXCLUSIVE MODE")
            steps("move_provision")
            draft = dataclasses.replace(tenant, strategy=placement, location={})
            location = {
                **target_placement.initial_location(None),
                **target_placement.provision(draft, admin=admin),
            }
            revision = location.pop("_revision", tenant.revision)
            moved = dataclasses.replace(draft, location=location)
            steps("move_copy")
            for table in tables:
                _copy(admin, tenant, moved, table)
            steps("move_verify")
            for table in tables:
                _verify(admin, tenant, moved, table)
            steps("move_remove_source")
            source = services.placement(tenant.strategy)
            source.deprovision(tenant, admin=admin, keep_infrastructure_rows=True)
            steps("move_switch")
            if blocked:
                _unblock_shared_writes(admin, tenant, tables)
            if not services.store.move(
                admin, tenant, placement=placement, location=location, revision=revision
            ):
                raise MoveError(
                    f"The registry row of tenant {tenant.slug!r} changed during the move (deleted, "
                    "suspended or moved by another process); nothing was moved."
                )
        blocked = False  # the policies went with the switch's commit
    except TenancyError as error:
        if isinstance(error, MoveError):
            raise
        raise MoveError(
            f"Moving tenant {tenant.slug!r} to {placement} failed: {error}; it is active at "
            f"its source ({tenant.strategy}), with all its rows."
        ) from error
    except Exception as error:
        raise MoveError(
            f"Moving tenant {tenant.slug!r} to {placement} failed at {type(error).__name__}: {error}; "
            f"it is active at its source ({tenant.strategy}), with all its rows, and the move can "
            "be retried."
        ) from error
    finally:
        if blocked:
            with services.engines.admin.begin() as admin:
                _unblock_shared_writes(admin, tenant, tables)
        services.registry.invalidate([tenant.id])
    log.info("moved tenant %s from %s to %s", tenant.slug, tenant.strategy, placement)
    return services.registry.get(tenant.id)


def _check(services: Services, tenant: Tenant, placement: str, server: str | None) -> None:
    services.placement(placement)  # UnknownPlacement
    if tenant.is_default:
        raise UnsupportedOperation("The default tenant cannot be moved.")
    if tenant.status != "active":
        raise UnsupportedOperation(
            f"Tenant {tenant.slug!r} is {tenant.status}: only an active tenant can be moved."
        )
    if placement == tenant.strategy:
        raise UnsupportedOperation(f"Tenant {tenant.slug!r} is a {placement} tenant already.")
    if placement not in MOVABLE or tenant.strategy not in MOVABLE:
        raise UnsupportedOperation(
            f"Moving a tenant from {tenant.strategy} to {placement} is not supported yet: only between "
            f"{' and '.join(sorted(MOVABLE))}. For a database tenant, export_tenant() and restore."
        )
    if server is not None:
        raise UnsupportedOperation("server= applies to moves to the database placement, not supported yet.")


def _block_shared_writes(services: Services, tenant: Tenant, tables: list[Table]) -> None:
    """Refuse the tenant's writes to the shared tables, committed; reads go on."""
    literal = f"{quote_literal(str(tenant.id))}::uuid"
    with services.engines.admin.begin() as admin:
        for table in tables:
            column = tenant_column_name(table)
            if column is None:
                continue
            target, other = qualified_name(table), f"{quote_ident(column)} <> {literal}"
            # one restrictive policy per command (INSERT takes WITH CHECK, DELETE USING only)
            for command, clause in (
                ("INSERT", f"WITH CHECK ({other})"),
                ("UPDATE", f"USING ({other}) WITH CHECK ({other})"),
                ("DELETE", f"USING ({other})"),
            ):
                policy = quote_ident(f"{_policy_name(tenant)}_{command.lower()}")
                admin.exec_driver_sql(
                    f"CREATE POLICY {policy} ON {target} AS RESTRICTIVE FOR {command} {clause}"
                )


def _unblock_shared_writes(admin: Connection, tenant: Tenant, tables: list[Table]) -> None:
    for table in tables:
        for command in ("insert", "update", "delete"):
            policy = quote_ident(f"{_policy_name(tenant)}_{command}")
            admin.exec_driver_sql(f"DROP POLICY IF EXISTS {policy} ON {qualified_name(table)}")


def _qualified(tenant: Tenant, table: Table) -> str:
    """Where ``tenant``'s copy of ``table`` is: its schema's, or the shared table."""
    schema = tenant.location.get("schema") if tenant.strategy == "schema" else None
    if schema:
        return f"{quote_ident(str(schema))}.{quote_ident(table.name)}"
    return qualified_name(table)


def _columns(table: Table) -> str:
    return ", ".join(quote_ident(c.name) for c in table.columns)


def _rows(tenant: Tenant, table: Table) -> str:
    column = tenant_column_name(table)
    assert column is not None
    return (
        f"select {_columns(table)} from {_qualified(tenant, table)} "
        f"where {quote_ident(column)} = {quote_literal(str(tenant.id))}::uuid"
    )


def _copy(admin: Connection, source: Tenant, target: Tenant, table: Table) -> None:
    destination = _qualified(target, table)
    admin.exec_driver_sql(
        f"INSERT INTO {destination} ({_columns(table)}) OVERRIDING SYSTEM VALUE {_rows(source, table)}"
    )
    # the target's own sequences (a schema's) continue after the copied keys
    if target.strategy == "schema":
        for column in table.primary_key.columns:
            sequence = admin.execute(
                text("select pg_get_serial_sequence(:t, :c)"), {"t": destination, "c": column.name}
            ).scalar()
            if sequence is not None:
                highest = f"(select max({quote_ident(column.name)}) from {destination})"
                admin.execute(
                    text(f"select setval(CAST(:s AS regclass), coalesce({highest}, 0) + 1, false)"),
                    {"s": sequence},
                )


def _digest(admin: Connection, tenant: Tenant, table: Table) -> tuple[int, str]:
    row: Any = admin.execute(
        text(
            f"select count(*), md5(coalesce(string_agg(r::text, E'\\n' order by r::text), '')) "
            f"from ({_rows(tenant, table)}) r"
        )
    ).one()
    return int(row[0]), str(row[1])


def _verify(admin: Connection, source: Tenant, target: Tenant, table: Table) -> None:
    before, after = _digest(admin, source, table), _digest(admin, target, table)
    if before != after:
        raise MoveError(
            f"The copy of {table.fullname} for tenant {source.slug!r} does not match its source "
            f"({before[0]} rows, md5 {before[1]}; copied {after[0]} rows, md5 {after[1]}): nothing "
            "was moved."
        )
