"""Creating and deleting tenants: the registry row and the placement's storage, all or nothing.

Transactional placements (shared, schema) provision inside the transaction that inserts the
registry row: a failure rolls everything back. The database placement cannot (``CREATE
DATABASE`` refuses to run in a transaction), so it is journaled: the row is committed first with
status ``provisioning``, and the placement journals each object in it before creating it; a
failure runs the placement's clean-up, which drops what the journal names and nothing else, and
removes the row; a retry that finds a crashed attempt's row cleans up after it first.

Before anything is made, every name the tenant's placement would create is checked against
:func:`library_names`, the names sqla-tenancy itself owns or connects as: a tenant can never take
(nor its clean-up ever drop) the template database, a group role or the main database.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text

from . import locks
from .anonymous import anonymous_gate, anonymous_group, anonymous_role
from .errors import ProvisioningError, TenancyError
from .identifiers import validate_slug
from .installer import tenants_group
from .registry import REGISTRY_SCHEMA, Tenant, TenantStore
from .strategies.database import template_database

if TYPE_CHECKING:
    from .strategies import Strategy
    from .tenancy import Tenancy

__all__ = ["NamedObject", "create_tenant", "delete_tenant", "library_names"]

log = logging.getLogger("sqla_tenancy.lifecycle")

STORE = TenantStore()


#: A database, schema or role, as ``(kind, name)``; kinds are ``database``, ``schema``, ``role``.
NamedObject = tuple[str, str]


def library_names(tenancy: Tenancy) -> dict[NamedObject, str]:
    """Every database, schema and role name that sqla-tenancy owns or relies on, as
    ``{(kind, name): what it is}``.

    No tenant may derive one of these (:func:`create_tenant` refuses it before creating
    anything): a failed provisioning's clean-up drops what it created, and must never be able to
    reach these. This is the one list: a new name the library creates belongs here (the test
    suite checks that every object :meth:`Tenancy.install` and ``prepare_server`` create is in it).
    """
    names: dict[NamedObject, str] = {}

    def add(kind: str, name: str | None, what: str) -> None:
        if name:
            names.setdefault((kind, name), what)

    add("database", tenancy.admin_url.database, "the main database")
    add("database", tenancy.url.database, "the main database")
    add("database", template_database(tenancy), "the template database of database tenants")
    for server, url in sorted(tenancy.servers.items()):
        add("database", url.database, f"the admin database of server {server!r}")
        add("role", url.username, f"the admin role of server {server!r}")
    for database in ("postgres", "template0", "template1"):
        add("database", database, "a database of PostgreSQL's own")
    add("role", tenancy.url.username, "the application role")
    add("role", tenancy.admin_url.username, "the admin role")
    add("role", tenants_group(tenancy), "the group role of the tenants' roles")
    add("role", anonymous_role(tenancy), "the shared placement's anonymous role")
    add("role", anonymous_group(tenancy), "the group role of the anonymous roles")
    add("role", anonymous_gate(tenancy), "the role through which the application reaches anonymous roles")
    add("schema", REGISTRY_SCHEMA, "the registry schema")
    add("schema", "public", "the public schema")
    for schema in sorted(tenancy.infrastructure_schemas):
        add("schema", schema, "an infrastructure schema")
    for schema in sorted({t.schema for t in tenancy.metadata.tables.values() if t.schema}):
        add("schema", schema, "a schema of the MetaData")
    return names


def _refuse_library_names(tenancy: Tenancy, placement: Strategy, tenant: Tenant) -> None:
    owned = library_names(tenancy)
    for (kind, name), what in placement.derived_names(tenancy, tenant).items():
        owner = owned.get((kind, name))
        if owner is not None:
            raise ProvisioningError(
                f"Tenant {tenant.slug!r} cannot be created as a {tenant.strategy} tenant: its {what} "
                f"would be the {kind} {name!r}, which is {owner}. sqla-tenancy never creates, nor "
                "drops, an object under a name of its own: choose another slug, or another name_prefix."
            )


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
    # The id is chosen here, so that every name the tenant would get (an FDW role's carries the
    # id) is checked before anything, the registry row included, exists.
    draft = Tenant(
        id=uuid.uuid4(),
        slug=slug,
        name=name or slug,
        strategy=strategy,
        status="provisioning",
        created_at=datetime.now(timezone.utc),
        location=location,
    )
    _refuse_library_names(tenancy, placement, draft)
    if placement.transactional:
        with tenancy.admin_engine.begin() as admin:
            registered = _register(tenancy, admin, draft)
            tenant = _activate(admin, registered, _provision(tenancy, placement, registered, admin))
    else:
        # Held for the whole journaled provisioning: a concurrent attempt for the same slug waits
        # here, so a 'provisioning' row seen below can only be a crashed attempt's (a crashed
        # process's session, and its lock, are gone).
        with tenancy.admin_engine.connect() as guard:
            guard.execute(text(locks.LOCK), {"key": locks.tenant_key(slug)})
            guard.commit()
            try:
                with tenancy.admin_engine.begin() as admin:
                    leftover = _leftover(admin, slug)
                if leftover is not None:
                    log.warning("cleaning up an interrupted provisioning of tenant %s", slug)
                    _clean_up(tenancy, tenancy.strategy_named(leftover.strategy), leftover)
                with tenancy.admin_engine.begin() as admin:
                    registered = _register(tenancy, admin, draft)
                try:
                    location = _provision(tenancy, placement, registered, None)
                    with tenancy.admin_engine.begin() as admin:
                        tenant = _activate(admin, registered, location)
                except BaseException:
                    _clean_up(tenancy, placement, registered)
                    raise
            finally:
                guard.execute(text(locks.UNLOCK), {"key": locks.tenant_key(slug)})
                guard.commit()
    tenancy.registry.invalidate([tenant.id])
    log.info("created tenant %s (%s)", slug, strategy)
    return tenant


def _register(tenancy: Tenancy, admin: Connection, draft: Tenant) -> Tenant:
    # Two processes creating the same slug: the second waits, then sees the first's row.
    admin.execute(text(locks.XACT_LOCK), {"key": locks.registration_key(draft.slug)})
    if STORE.get(admin, draft.slug) is not None:
        raise ProvisioningError(f"Tenant {draft.slug!r} exists already.")
    tenancy._step("register")
    return STORE.insert(admin, draft)  # status "provisioning", as drafted


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


def _activate(admin: Connection, tenant: Tenant, location: dict[str, Any]) -> Tenant:
    # A strategy reports the tenant stream revision the tenant was born at under "_revision".
    location = dict(location)
    revision = location.pop("_revision", None)
    active = STORE.activate(admin, tenant, location, revision)
    if active is None:
        raise ProvisioningError(
            f"The registry row of tenant {tenant.slug!r} changed while it was being provisioned "
            "(deleted by another process?); its provisioning was undone."
        )
    return active


def _leftover(admin: Connection, slug: str) -> Tenant | None:
    admin.execute(text(locks.XACT_LOCK), {"key": locks.registration_key(slug)})
    tenant = STORE.get(admin, slug)
    return tenant if tenant is not None and tenant.status == "provisioning" else None


def _clean_up(tenancy: Tenancy, placement: Strategy, tenant: Tenant) -> None:
    """Remove every trace of a failed provisioning; the row goes last, once nothing is left."""
    placement.compensate(tenancy, tenant)
    with tenancy.admin_engine.begin() as admin:
        STORE.delete(admin, tenant.id)
    tenancy.registry.invalidate([tenant.id])


def delete_tenant(tenancy: Tenancy, tenant: Tenant, *, keep_infrastructure_rows: bool) -> None:
    if tenant.is_default:
        raise TenancyError("The default tenant cannot be deleted.")
    placement = tenancy.strategy_named(tenant.strategy)
    if placement.transactional:
        with tenancy.admin_engine.begin() as admin:
            # a migration of this tenant (which holds the same lock) finishes first
            admin.execute(text(locks.XACT_LOCK), {"key": locks.tenant_key(tenant.slug)})
            placement.deprovision(
                tenancy, tenant, admin=admin, keep_infrastructure_rows=keep_infrastructure_rows
            )
            STORE.delete(admin, tenant.id)
    else:
        # Refused everywhere first (the notification reaches every process), then dismantled.
        with tenancy.admin_engine.begin() as admin:
            # a running migration of the tenant ends first
            admin.execute(text(locks.XACT_LOCK), {"key": locks.tenant_key(tenant.slug)})
            STORE.set_status(admin, tenant.id, "deleting")
        tenancy.registry.invalidate([tenant.id])
        placement.deprovision(tenancy, tenant, admin=None, keep_infrastructure_rows=keep_infrastructure_rows)
        with tenancy.admin_engine.begin() as admin:
            STORE.delete(admin, tenant.id)
    tenancy.registry.invalidate([tenant.id])
    log.info("deleted tenant %s", tenant.slug)
