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

from sqlalchemy import Connection, exc, text

from . import locks
from .anonymous import anonymous_gate, anonymous_group, anonymous_role
from .errors import DeletionError, ProvisioningError, TenancyError, UnsupportedOperation
from .grants import is_keeper_role, tenants_group
from .identifiers import validate_slug
from .placements.database import template_database
from .registry import REGISTRY_SCHEMA, Tenant
from .steps import Steps

if TYPE_CHECKING:
    from .config import TenancyConfig
    from .placements import Placement
    from .services import Services

__all__ = ["NamedObject", "create_tenant", "delete_tenant", "library_names", "wait_out"]

log = logging.getLogger("sqla_tenancy.lifecycle")


#: A database, schema or role, as ``(kind, name)``; kinds are ``database``, ``schema``, ``role``.
NamedObject = tuple[str, str]


def library_names(config: TenancyConfig) -> dict[NamedObject, str]:
    """Every database, schema and role name that sqla-tenancy owns or relies on, as
    ``{(kind, name): what it is}``.

    No tenant may derive one of these (:func:`create_tenant` refuses it before creating
    anything): a failed provisioning's clean-up drops what it created, and must never be able to
    reach these. This is the one list: a new name the library creates belongs here (the test
    suite checks that every object :meth:`Tenancy.install` and ``prepare_server`` create is in it).
    The keeper roles that create schema tenants' roles (``<prefix>_keeper_<5 digits>``, made as the
    fleet grows: see :mod:`sqla_tenancy.grants`) are a pattern, not a list:
    :func:`~sqla_tenancy.grants.is_keeper_role` tells them, and no tenant may derive one either.
    """
    names: dict[NamedObject, str] = {}

    def add(kind: str, name: str | None, what: str) -> None:
        if name:
            names.setdefault((kind, name), what)

    add("database", config.admin_url.database, "the main database")
    add("database", config.url.database, "the main database")
    add("database", template_database(config), "the template database of database tenants")
    for server, url in sorted(config.servers.items()):
        add("database", url.database, f"the admin database of server {server!r}")
        add("role", url.username, f"the admin role of server {server!r}")
    for database in ("postgres", "template0", "template1"):
        add("database", database, "a database of PostgreSQL's own")
    add("role", config.app_role, "the application role")
    add("role", config.admin_url.username, "the admin role")
    add("role", tenants_group(config), "the group role of the tenants' roles")
    add("role", anonymous_role(config), "the shared placement's anonymous role")
    add("role", anonymous_group(config), "the group role of the anonymous roles")
    add("role", anonymous_gate(config), "the role through which the application reaches anonymous roles")
    add("schema", REGISTRY_SCHEMA, "the registry schema")
    add("schema", "public", "the public schema")
    for schema in sorted(config.infrastructure_schemas):
        add("schema", schema, "an infrastructure schema")
    for schema in sorted({t.schema for t in config.metadata.tables.values() if t.schema}):
        add("schema", schema, "a schema of the MetaData")
    return names


def _refuse_library_names(config: TenancyConfig, placement: Placement, tenant: Tenant) -> None:
    owned = library_names(config)
    for (kind, name), what in placement.derived_names(tenant).items():
        owner = owned.get((kind, name))
        if owner is None and kind == "role" and is_keeper_role(config, name):
            owner = "a keeper role of the schema tenants' roles"
        if owner is not None:
            raise ProvisioningError(
                f"Tenant {tenant.slug!r} cannot be created as a {tenant.strategy} tenant: its {what} "
                f"would be the {kind} {name!r}, which is {owner}. sqla-tenancy never creates, nor "
                "drops, an object under a name of its own: choose another slug, or another name_prefix."
            )


def create_tenant(
    services: Services, slug: str, *, placement_name: str, name: str | None, server: str | None
) -> Tenant:
    validate_slug(slug)
    placement = services.placement(placement_name)
    location = placement.initial_location(server)
    # The id is chosen here, so that every name the tenant would get (an FDW role's carries the
    # id) is checked before anything, the registry row included, exists.
    draft = Tenant(
        id=uuid.uuid4(),
        slug=slug,
        name=name or slug,
        strategy=placement_name,
        status="provisioning",
        created_at=datetime.now(timezone.utc),
        location=location,
    )
    _refuse_library_names(services.config, placement, draft)
    admin_engine = services.engines.admin
    if placement.transactional:
        with admin_engine.begin() as admin:
            registered = _register(services, admin, draft)
            tenant = _activate(
                services, admin, registered, _provision(services, placement, registered, admin)
            )
    else:
        # Held for the whole journaled provisioning: a concurrent attempt for the same slug waits
        # here, so a 'provisioning' row seen below can only be a crashed attempt's (a crashed
        # process's session, and its lock, are gone).
        with admin_engine.connect() as guard, locks.session_lock(guard, locks.tenant_key(slug)):
            with admin_engine.begin() as admin:
                leftover = _leftover(services, admin, slug)
            if leftover is not None:
                log.warning("cleaning up an interrupted provisioning of tenant %s", slug)
                _clean_up(services, services.placement(leftover.strategy), leftover)
            with admin_engine.begin() as admin:
                registered = _register(services, admin, draft)
            try:
                location = _provision(services, placement, registered, None)
                with admin_engine.begin() as admin:
                    tenant = _activate(services, admin, registered, location)
            except BaseException:
                _clean_up(services, placement, registered)
                raise
    services.registry.invalidate([tenant.id])
    log.info("created tenant %s (%s)", slug, placement_name)
    return tenant


def _register(services: Services, admin: Connection, draft: Tenant) -> Tenant:
    # Two processes creating the same slug: the second waits, then sees the first's row.
    admin.execute(text(locks.XACT_LOCK), {"key": locks.registration_key(draft.slug)})
    existing = services.store.get(admin, draft.slug)
    if existing is not None and existing.status == "deleting":
        raise ProvisioningError(
            f"Tenant {draft.slug!r} is being deleted (an earlier delete_tenant({draft.slug!r}) "
            f"stopped part way); rerun delete_tenant({draft.slug!r}) to finish, then create it."
        )
    if existing is not None:
        raise ProvisioningError(f"Tenant {draft.slug!r} exists already.")
    services.steps("register")
    return services.store.insert(admin, draft)  # status "provisioning", as drafted


def _provision(
    services: Services, placement: Placement, tenant: Tenant, admin: Connection | None
) -> dict[str, Any]:
    try:
        location = {**tenant.location, **placement.provision(tenant, admin=admin)}
        services.steps("activate")
        return location
    except TenancyError:
        raise
    except Exception as exc:
        step = Steps.current()
        where = f"step {step!r} " if step else ""
        raise ProvisioningError(
            f"Provisioning tenant {tenant.slug!r} ({tenant.strategy}) failed at "
            f"{where}({type(exc).__name__}: {exc}); nothing of it was kept, retrying is safe."
        ) from exc


def _activate(services: Services, admin: Connection, tenant: Tenant, location: dict[str, Any]) -> Tenant:
    # A placement reports the tenant stream revision the tenant was born at under "_revision".
    location = dict(location)
    revision = location.pop("_revision", None)
    active = services.store.activate(admin, tenant, location, revision)
    if active is None:
        raise ProvisioningError(
            f"The registry row of tenant {tenant.slug!r} changed while it was being provisioned "
            "(deleted by another process?); its provisioning was undone."
        )
    return active


def _leftover(services: Services, admin: Connection, slug: str) -> Tenant | None:
    admin.execute(text(locks.XACT_LOCK), {"key": locks.registration_key(slug)})
    tenant = services.store.get(admin, slug)
    return tenant if tenant is not None and tenant.status == "provisioning" else None


def _clean_up(services: Services, placement: Placement, tenant: Tenant) -> None:
    """Remove every trace of a failed provisioning; the row goes last, once nothing is left."""
    placement.compensate(tenant)
    with services.engines.admin.begin() as admin:
        services.store.delete(admin, tenant.id)
    services.registry.invalidate([tenant.id])


def delete_tenant(
    services: Services, tenant: Tenant, *, keep_infrastructure_rows: bool, timeout: float = 30.0
) -> None:
    """Stop the tenant everywhere, then remove it.

    First its registry row becomes ``deleting``, committed: every process refuses the tenant
    once the notification arrives, and the database refuses it whatever a process's cache says
    (``tenancy.admit()`` for shared and schema tenants; a database tenant's roles lose
    ``LOGIN`` and their sessions are ended). Then the transactions still in flight are waited
    out (up to ``timeout`` seconds) or ended, and only then is anything deleted: no transaction of
    the tenant commits after its rows went. A failure leaves the row ``deleting`` (the tenant
    stays refused) and raises :class:`DeletionError`; running the deletion again finishes it.
    """
    if tenant.is_default:
        raise UnsupportedOperation("The default tenant cannot be deleted.")
    placement = services.placement(tenant.strategy)
    admin_engine = services.engines.admin
    with admin_engine.begin() as admin:
        # a running migration of the tenant (which holds the same lock) ends first
        admin.execute(text(locks.XACT_LOCK), {"key": locks.tenant_key(tenant.slug)})
        services.store.set_status(admin, tenant.id, "deleting")
    services.registry.invalidate([tenant.id])
    try:
        if placement.transactional:
            with admin_engine.begin() as admin:
                admin.execute(text(locks.XACT_LOCK), {"key": locks.tenant_key(tenant.slug)})
                if placement.admitted:
                    wait_out(admin, tenant, timeout)
                placement.deprovision(tenant, admin=admin, keep_infrastructure_rows=keep_infrastructure_rows)
                services.store.delete(admin, tenant.id)
        else:
            placement.deprovision(tenant, admin=None, keep_infrastructure_rows=keep_infrastructure_rows)
            with admin_engine.begin() as admin:
                services.store.delete(admin, tenant.id)
    except TenancyError:
        raise
    except Exception as exc:
        raise DeletionError(
            f"Deleting tenant {tenant.slug!r} ({tenant.strategy}) stopped at "
            f"{type(exc).__name__}: {exc}. The tenant stays registered as 'deleting' and is "
            f"refused everywhere; rerun delete_tenant({tenant.slug!r}) to finish."
        ) from exc
    finally:
        services.registry.invalidate([tenant.id])
    log.info("deleted tenant %s", tenant.slug)


def wait_out(admin: Connection, tenant: Tenant, timeout: float) -> None:
    """Take the tenant's serving lock exclusively: wait for the transactions that
    ``tenancy.admit()`` admitted to end, and refuse new ones until ``admin`` commits."""
    key = locks.serving_key(tenant.id)
    admin.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(timeout * 1000))}")
    admin.exec_driver_sql("SAVEPOINT tenancy_wait_out")
    try:
        admin.execute(text(locks.XACT_LOCK), {"key": key})
    except exc.OperationalError as error:
        if getattr(error.orig, "sqlstate", None) != "55P03":  # lock_not_available
            raise
        admin.exec_driver_sql("ROLLBACK TO SAVEPOINT tenancy_wait_out")
        # (pg_stat_activity shows other roles' sessions' state only to those who may read it)
        holders = admin.execute(
            text(
                "select pid from pg_locks where locktype = 'advisory' and granted "
                "and mode = 'ShareLock' and objid = (hashtext(:key)::bigint & 4294967295) "
                "order by pid"
            ),
            {"key": key},
        ).scalars()
        described = ", ".join(f"pid {pid}" for pid in holders)
        raise DeletionError(
            f"Tenant {tenant.slug!r} is refused everywhere, but transactions of it were still in "
            f"flight after {timeout:g} s ({described or 'ended meanwhile'}); nothing of it was "
            f"deleted. End them (pg_terminate_backend) or let them finish, then rerun "
            f"delete_tenant({tenant.slug!r})."
        ) from error
    admin.exec_driver_sql("RELEASE SAVEPOINT tenancy_wait_out")
    admin.exec_driver_sql("SET LOCAL lock_timeout = DEFAULT")
