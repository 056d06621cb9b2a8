"""before_migrate / after_migrate: the fleet runner tells the lifecycle callbacks about each
tenant it migrates, with the outcome."""

from __future__ import annotations

from alembic_ext import migrate_fleet
from alembic_ext.versions import TENANT
from sqla_tenancy import TenantEvent

from .conftest import Project


def test_migrations_are_lifecycle_events(migrated: Project) -> None:
    t = migrated.tenancy
    t.create_tenant("acme", placement="schema")
    t.create_tenant("globex")
    revision = migrated.add_revision(TENANT, 'op.add_column("projects", sa.Column("code", sa.Text()))')
    seen: list[tuple[str, str, object]] = []

    @t.on("before_migrate")
    @t.on("after_migrate")
    def record(event: TenantEvent) -> None:
        seen.append((event.name, event.slug, event.details.get("status")))

    report = migrate_fleet(t, migrated.config())
    assert report.ok
    assert sorted(seen) == sorted(
        [
            ("before_migrate", "default", None),
            ("after_migrate", "default", "upgraded"),
            ("before_migrate", "globex", None),
            ("after_migrate", "globex", "upgraded"),
            ("before_migrate", "acme", None),
            ("after_migrate", "acme", "upgraded"),
        ]
    )
    assert seen.index(("before_migrate", "acme", None)) < seen.index(("after_migrate", "acme", "upgraded"))
    assert t.get_tenant("acme").revision == revision
