"""Instant database tenants: a pool of pending tenants, provisioned ahead and claimed atomically.

Provisioning a database tenant takes seconds (``CREATE DATABASE``, roles, the foreign schemas).
:func:`fill_pool` does that work ahead, for tenants with a placeholder slug
(``pending_<hex>``) and the status ``pending``: no request can reach them, the doctor checks
them, and the migration runner keeps them at head. :meth:`Tenancy.create_tenant` with
``placement="database"`` on the main server then **claims** the oldest pending tenant instead
of provisioning one, in one transaction of the main database: the database and the roles are
renamed to the new slug's names (the login role gets the password derived for its new name),
and the registry row becomes the active tenant. Concurrent claims take different pending
tenants (``FOR UPDATE SKIP LOCKED``); a failure rolls the claim back, leaving the pool as it
was. An empty pool means provisioning as usual.

``Tenancy(pending_tenants={"database": N})`` keeps N pending tenants: :func:`refill_pool` tops
the pool up (one refill at a time across processes, under :data:`~sqla_tenancy.locks.POOL_KEY`),
``sqla-tenancy tenants pool --refill`` runs it, and the process that created a database tenant
runs it in a background thread afterwards.

The tenant keeps the id it was provisioned with, which its FDW role's name and its objects'
markers carry; only names derived from the slug change. Claiming needs the pending tenant's
server to be the main database's cluster (``ALTER DATABASE ... RENAME`` and ``ALTER ROLE`` run in
the claiming transaction), so the pool holds tenants of the ``main`` server only.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text

from . import locks
from .errors import ProvisioningError, UnsupportedOperation
from .identifiers import quote_ident, quote_literal, validate_slug
from .lifecycle import create_tenant, library_names
from .passwords import derive_password, scram_verifier
from .placements.database import DatabasePlacement
from .registry import Tenant

if TYPE_CHECKING:
    from .services import Services

__all__ = ["PENDING_PREFIX", "claim", "fill_pool", "pending_tenants", "refill_pool"]

log = logging.getLogger("sqla_tenancy.lifecycle")

#: The slugs of pending tenants start with this (a slug anybody else could take, but at 12 random
#: hex digits nobody will).
PENDING_PREFIX = "pending_"


def _placement(services: Services) -> DatabasePlacement:
    placement = services.placement("database")
    assert isinstance(placement, DatabasePlacement)
    return placement


def pending_tenants(services: Services) -> list[Tenant]:
    """The pool: pending database tenants, oldest (the next claimed) first."""
    with services.engines.admin.connect() as conn:
        return services.store.list(conn, statuses=["pending"])


def fill_pool(services: Services, count: int, *, server: str | None = None) -> list[Tenant]:
    """Provision ``count`` pending database tenants; the ones made (a failure stops the filling
    and raises, with nothing of the failed one left, as for any provisioning)."""
    if server not in (None, "main"):
        raise UnsupportedOperation(
            "The tenant pool holds tenants of the main server only: claiming renames the database "
            "and roles in the main database's transaction."
        )
    if count < 0:
        raise ValueError("fill_pool() takes a count >= 0")
    made = []
    for _ in range(count):
        slug = f"{PENDING_PREFIX}{secrets.token_hex(6)}"
        tenant = create_tenant(services, slug, placement_name="database", name=slug, server=None)
        with services.engines.admin.begin() as admin:
            services.store.set_status(admin, tenant.id, "pending")
        services.registry.invalidate([tenant.id])
        made.append(dataclasses.replace(tenant, status="pending"))
        log.info("pool: provisioned pending tenant %s", slug)
    return made


def refill_pool(services: Services, target: int, *, stop: threading.Event | None = None) -> list[Tenant]:
    """Provision pending database tenants until the pool holds ``target`` (counted again before
    each one, so claims made meanwhile are replaced too); the ones made. While another process
    (or thread) tops the pool up, this returns ``[]`` at once: that one fills it. ``stop`` set:
    return after the tenant in progress (nothing is left half-made)."""
    if target < 0:
        raise ValueError("refill_pool() takes a target >= 0")
    made: list[Tenant] = []
    with (
        services.engines.admin.connect() as conn,
        locks.session_lock(conn, locks.POOL_KEY, wait=False) as got,
    ):
        if not got:
            log.info("pool: another process is topping the pool up; leaving it to that one")
            return made
        while stop is None or not stop.is_set():
            if len(pending_tenants(services)) >= target:
                break
            made += fill_pool(services, 1)
    return made


def claim(services: Services, slug: str, *, name: str | None, server: str | None) -> Tenant | None:
    """Turn the oldest pending tenant into the active tenant ``slug``; None when the pool (of the
    main server) is empty, or ``server`` names another server."""
    validate_slug(slug)
    if server not in (None, "main"):
        return None
    placement = _placement(services)
    owned = library_names(services.config)
    with services.engines.admin.begin() as admin:
        admin.execute(text(locks.XACT_LOCK), {"key": locks.registration_key(slug)})
        if services.store.get(admin, slug) is not None:
            # taken, or a crashed provisioning of it: provisioning refuses, or cleans up first
            return None
        pending = services.store.claim_pending(admin, server="main")
        if pending is None:
            return None
        target = dataclasses.replace(pending, slug=slug)
        for (kind, object_name), what in placement.derived_names(target).items():
            if (kind, object_name) in owned:
                raise ProvisioningError(
                    f"Tenant {slug!r} cannot be created: its {what} would be the {kind} "
                    f"{object_name!r}, which is {owned[(kind, object_name)]}. Choose another slug."
                )
        old, new = placement.names(pending), placement.names(target)
        _refuse_taken(admin, slug, new.database, [new.app_role, new.anon_role])
        services.steps("claim")
        password = derive_password(services.config.secret(), new.app_role)
        database = quote_ident(str(pending.location["database"]))
        admin.exec_driver_sql(f"ALTER DATABASE {database} RENAME TO {quote_ident(new.database)}")
        admin.exec_driver_sql(f"ALTER ROLE {quote_ident(old.app_role)} RENAME TO {quote_ident(new.app_role)}")
        admin.exec_driver_sql(
            f"ALTER ROLE {quote_ident(new.app_role)} PASSWORD "
            f"{quote_literal(scram_verifier(password, iterations=services.config.tenant_scram_iterations))}"
        )
        admin.exec_driver_sql(
            f"ALTER ROLE {quote_ident(old.anon_role)} RENAME TO {quote_ident(new.anon_role)}"
        )
        location = {**pending.location, "database": new.database, "role": new.app_role}
        services.steps("activate")
        tenant = services.store.claimed(admin, pending, slug=slug, name=name or slug, location=location)
    services.registry.invalidate([tenant.id])
    log.info("created tenant %s (database) from the pool (was %s)", slug, pending.slug)
    return tenant


def _refuse_taken(admin: Connection, slug: str, database: str, roles: list[str]) -> None:
    if admin.execute(text("select 1 from pg_database where datname = :d"), {"d": database}).first():
        raise ProvisioningError(
            f"The database {database!r} exists already, and tenant {slug!r} did not create it; "
            "sqla-tenancy neither adopts nor drops it."
        )
    for role in roles:
        if admin.execute(text("select 1 from pg_roles where rolname = :r"), {"r": role}).first():
            raise ProvisioningError(
                f"The role {role!r} exists already, and tenant {slug!r} did not create it; "
                "sqla-tenancy neither adopts nor drops it."
            )
