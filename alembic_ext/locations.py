"""Where the tenant stream runs: the *locations* of a fleet and the tenants each one serves.

* ``main``: the main database's tenant tables, serving the shared tenants and the default tenant
  (one location, migrated once);
* ``schema``: one per schema tenant (its schema in the main database);
* ``database``: one per database tenant (its own database, on any server);
* ``template``: the template database of each server that database tenants are cloned from, kept
  at head so that new tenants are born at head.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sqla_tenancy.errors import TenantNotFound
from sqla_tenancy.placements import MigrationSite
from sqla_tenancy.placements.database import template_database
from sqla_tenancy.registry import REGISTRY_SCHEMA, Tenant, TenantStore

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from sqla_tenancy.tenancy import Tenancy

__all__ = ["Location", "main_location", "tenant_locations", "template_locations"]

LocationKind = Literal["main", "schema", "database", "template"]
#: tenants in these states are migrated (provisioning ones are born at head; deleting ones go)
#: pending tenants (the pool's) are migrated too, so that a claimed tenant is at head
MIGRATED_STATUSES = ("active", "suspended", "pending")


@dataclass(frozen=True)
class Location:
    """One place the tenant stream is applied, with the tenants whose registry copy follows it."""

    kind: LocationKind
    #: ``main``, a tenant's slug, or ``template@<server>``
    name: str
    tenants: tuple[Tenant, ...] = field(default=(), compare=False)
    server: str = "main"
    database: str | None = None
    schema: str | None = None

    @property
    def version_schema(self) -> str:
        """The schema holding the location's version table."""
        return self.schema if self.kind == "schema" and self.schema else REGISTRY_SCHEMA

    @property
    def tenant(self) -> Tenant | None:
        """The tenant this location belongs to alone (schema and database tenants)."""
        return self.tenants[0] if self.kind in ("schema", "database") else None

    @property
    def revision(self) -> str | None:
        """The registry's copy of the location's revision (the first tenant's; None if unknown)."""
        return self.tenants[0].revision if self.tenants else None

    def describe(self) -> str:
        if self.kind == "main":
            return "main database (shared and default tenants)"
        if self.kind == "schema":
            return f"tenant {self.name} (schema {self.schema})"
        if self.kind == "database":
            return f"tenant {self.name} (database {self.database} on {self.server})"
        return f"template database {self.database} on {self.server}"


def main_location(tenancy: Tenancy, tenants: Iterable[Tenant]) -> Location:
    """The main database: its tenant tables are those of every tenant without a site of its own."""
    shared = tuple(t for t in tenants if _site(tenancy, t) is None and t.status in MIGRATED_STATUSES)
    return Location("main", "main", shared)


def _site(tenancy: Tenancy, tenant: Tenant) -> MigrationSite | None:
    return tenancy.router.placement_of(tenant).migration_site(tenant)


def _location_of(tenancy: Tenancy, tenant: Tenant) -> Location:
    site = _site(tenancy, tenant)
    if site is None:
        raise ValueError(f"tenant {tenant.slug!r} has no location of its own ({tenant.placement})")
    return Location(
        site.kind, tenant.slug, (tenant,), server=site.server, database=site.database, schema=site.schema
    )


def tenant_locations(
    tenancy: Tenancy,
    tenants: Sequence[Tenant] | None = None,
    *,
    only: Sequence[str] | None = None,
    templates: bool = True,
) -> list[Location]:
    """Every location of the tenant stream, in the order a run visits them: the main database, the
    template databases, then schema and database tenants oldest first.

    ``only`` (slugs or ids) narrows the run to those tenants' locations (a shared tenant's is the
    main database); templates are then left out. Unknown names raise :class:`TenantNotFound`.
    """
    tenants = list(tenants) if tenants is not None else tenancy.list_tenants()
    live = [t for t in tenants if t.status in MIGRATED_STATUSES]
    if only is not None:
        by_key: dict[str, Tenant] = {}
        for t in tenants:
            by_key[t.slug] = t
            by_key[str(t.id)] = t
        chosen: list[Tenant] = []
        for ref in only:
            tenant = by_key.get(ref.strip())
            if tenant is None:
                raise TenantNotFound(ref)
            if tenant.status not in MIGRATED_STATUSES:
                raise TenantNotFound(f"{ref} (status {tenant.status})")
            if tenant not in chosen:
                chosen.append(tenant)
        locations: list[Location] = []
        if any(_site(tenancy, t) is None for t in chosen):
            locations.append(main_location(tenancy, live))
        locations += [_location_of(tenancy, t) for t in chosen if _site(tenancy, t) is not None]
        return locations
    locations = [main_location(tenancy, live)]
    if templates:
        locations += template_locations(tenancy)
    locations += [_location_of(tenancy, t) for t in live if _site(tenancy, t) is not None]
    return locations


def template_locations(tenancy: Tenancy) -> list[Location]:
    """The template databases that exist on the configured servers (``prepare_server`` creates
    them); one catalog query per server."""
    name = template_database(tenancy.config)
    found = []
    for server in sorted(tenancy.servers):
        engine = create_engine(tenancy.server_admin_url(server), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                exists = conn.execute(
                    text("select 1 from pg_database where datname = :d"), {"d": name}
                ).first()
        finally:
            engine.dispose()
        if exists:
            found.append(Location("template", f"template@{server}", (), server=server, database=name))
    return found


def registry_ids(location: Location) -> list[uuid.UUID]:
    return [t.id for t in location.tenants]


def update_registry_copy(main: Connection, location: Location, revision: str | None) -> None:
    """Write the location's revision into the registry rows of the tenants it serves (for the main
    database: every shared tenant, including ones created since the run started)."""
    if location.kind == "template":
        return
    if location.kind == "main":
        TenantStore().set_revision(main, revision)
    else:
        TenantStore().set_revision(main, revision, ids=registry_ids(location))
