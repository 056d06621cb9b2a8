"""Creating and deleting tenants: the registry row and the placement's storage, all or nothing.

Transactional placements (shared, schema) provision inside the transaction that inserts the
registry row: a failure rolls everything back. The database placement cannot (``CREATE
DATABASE`` refuses to run in a transaction), so it is journaled: the row is committed first with
status ``provisioning`` and every name it will create; each step is idempotent; a failure runs the
placement's idempotent clean-up and removes the row, and a retry that finds a crashed attempt's
row cleans up after it first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text

from .errors import ProvisioningError, TenancyError
from .identifiers import validate_slug
from .registry import Tenant

if TYPE_CHECKING:
    from .strategies import Strategy
    from .tenancy import Tenancy

__all__ = ["create_tenant", "delete_tenant"]

log = logging.getLogger("sqla_tenancy.lifecycle")

_LOCK = "select pg_advisory_xact_lock(hashtext('sqla_tenancy:' || :s))"
_SESSION_LOCK = "select pg_advisory_lock(hashtext('sqla_tenancy:provision:' || :s))"
_SESSION_UNLOCK = "select pg_advisory_unlock(hashtext('sqla_tenancy:provision:' || :s))"
_XACT_PROVISION_LOCK = "select pg_advisory_xact_lock(hashtext('sqla_tenancy:provision:' || :s))"


def create_tenant(
    tenancy: Tenancy, slug: str, *, strategy: str, name: str | None, server: str | None
) -> Tenant:
    validate_slug(slug)
    placement = tenancy.strategy_named(strategy)
    if server is not None:
        if strategy != "database":
            raise ProvisioningError("server= applies to strategy='database' only.")
        tenancy.server_admin_url(server)  # raises for an unknown server
    location: dict[str, Any] = {"server": server or "main"} if strategy == "database" else {}
    if placement.transactional:
        with tenancy.admin_engine.begin() as admin:
            tenant = _register(tenancy, admin, slug, name, strategy, location)
            location = _provision(tenancy, placement, tenant, admin)
            _activate(admin, tenant, location)
    else:
        # Held for the whole journaled provisioning: a concurrent attempt for the same slug waits
        # here, so a 'provisioning' row seen below can only be a crashed attempt's (a crashed
        # process's session, and its lock, are gone).
        with tenancy.admin_engine.connect() as guard:
            guard.execute(text(_SESSION_LOCK), {"s": slug})
            guard.commit()
            try:
                with tenancy.admin_engine.begin() as admin:
                    leftover = _leftover(admin, slug)
                if leftover is not None:
                    log.warning("cleaning up an interrupted provisioning of tenant %s", slug)
                    _clean_up(tenancy, tenancy.strategy_named(leftover.strategy), leftover)
                with tenancy.admin_engine.begin() as admin:
                    tenant = _register(tenancy, admin, slug, name, strategy, location)
                try:
                    location = _provision(tenancy, placement, tenant, None)
                    with tenancy.admin_engine.begin() as admin:
                        _activate(admin, tenant, location)
                except BaseException:
                    _clean_up(tenancy, placement, tenant)
                    raise
            finally:
                guard.execute(text(_SESSION_UNLOCK), {"s": slug})
                guard.commit()
    tenancy.registry.invalidate([tenant.id])
    log.info("created tenant %s (%s)", slug, strategy)
    return dataclasses.replace(tenant, location=location)


def _register(
    tenancy: Tenancy, admin: Connection, slug: str, name: str | None, strategy: str, location: dict[str, Any]
) -> Tenant:
    # Two processes creating the same slug: the second waits, then sees the first's row.
    admin.execute(text(_LOCK), {"s": slug})
    exists = admin.execute(text("select 1 from tenancy.tenants where slug = :s"), {"s": slug}).first()
    if exists:
        raise ProvisioningError(f"Tenant {slug!r} exists already.")
    tenancy._step("register")
    row = admin.execute(
        text(
            "insert into tenancy.tenants (slug, name, strategy, status, location) "
            "values (:slug, :name, :strategy, 'provisioning', :loc) returning id, created_at"
        ),
        {"slug": slug, "name": name or slug, "strategy": strategy, "loc": json.dumps(location)},
    ).one()
    return Tenant(
        id=row.id,
        slug=slug,
        name=name or slug,
        strategy=strategy,
        status="active",
        created_at=row.created_at,
        location=location,
    )


def _provision(
    tenancy: Tenancy, placement: Strategy, tenant: Tenant, admin: Connection | None
) -> dict[str, Any]:
    try:
        location = {**tenant.location, **placement.provision(tenancy, tenant, admin=admin)}
        tenancy._step("activate")
        return location
    except TenancyError:
        raise
    except Exception as exc:
        raise ProvisioningError(
            f"Provisioning tenant {tenant.slug!r} ({tenant.strategy}) failed at "
            f"{type(exc).__name__}: {exc}; nothing of it was kept, retrying is safe."
        ) from exc


def _activate(admin: Connection, tenant: Tenant, location: dict[str, Any]) -> None:
    # A strategy reports the tenant stream revision the tenant was born at under "_revision".
    revision = location.pop("_revision", None)
    result = admin.execute(
        text(
            "update tenancy.tenants set status = 'active', location = :loc, revision = :rev "
            "where id = :id and status = 'provisioning'"
        ),
        {"loc": json.dumps(location), "id": tenant.id, "rev": revision},
    )
    if result.rowcount != 1:
        raise ProvisioningError(
            f"The registry row of tenant {tenant.slug!r} changed while it was being provisioned "
            "(deleted by another process?); its provisioning was undone."
        )


def _leftover(admin: Connection, slug: str) -> Tenant | None:
    admin.execute(text(_LOCK), {"s": slug})
    row = admin.execute(
        text("select id, name, strategy, status, created_at, location from tenancy.tenants where slug = :s"),
        {"s": slug},
    ).first()
    if row is None or row.status != "provisioning":
        return None
    return Tenant(
        id=row.id,
        slug=slug,
        name=row.name,
        strategy=row.strategy,
        status=row.status,
        created_at=row.created_at,
        location=dict(row.location),
    )


def _clean_up(tenancy: Tenancy, placement: Strategy, tenant: Tenant) -> None:
    """Remove every trace of a failed provisioning; the row goes last, once nothing is left."""
    placement.compensate(tenancy, tenant)
    with tenancy.admin_engine.begin() as admin:
        admin.execute(text("delete from tenancy.tenants where id = :id"), {"id": tenant.id})
    tenancy.registry.invalidate([tenant.id])


def delete_tenant(tenancy: Tenancy, tenant: Tenant, *, keep_infrastructure_rows: bool) -> None:
    if tenant.is_default:
        raise TenancyError("The default tenant cannot be deleted.")
    placement = tenancy.strategy_named(tenant.strategy)
    if placement.transactional:
        with tenancy.admin_engine.begin() as admin:
            # a migration of this tenant (which holds the same lock) finishes first
            admin.execute(text(_XACT_PROVISION_LOCK), {"s": tenant.slug})
            placement.deprovision(
                tenancy, tenant, admin=admin, keep_infrastructure_rows=keep_infrastructure_rows
            )
            admin.execute(text("delete from tenancy.tenants where id = :id"), {"id": tenant.id})
    else:
        # Refused everywhere first (the notification reaches every process), then dismantled.
        with tenancy.admin_engine.begin() as admin:
            admin.execute(text(_XACT_PROVISION_LOCK), {"s": tenant.slug})  # a running migration ends
            admin.execute(
                text("update tenancy.tenants set status = 'deleting' where id = :id"), {"id": tenant.id}
            )
        tenancy.registry.invalidate([tenant.id])
        placement.deprovision(tenancy, tenant, admin=None, keep_infrastructure_rows=keep_infrastructure_rows)
        with tenancy.admin_engine.begin() as admin:
            admin.execute(text("delete from tenancy.tenants where id = :id"), {"id": tenant.id})
    tenancy.registry.invalidate([tenant.id])
    log.info("deleted tenant %s", tenant.slug)
