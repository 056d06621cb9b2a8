"""The pytest plugin brings an application with Alembic migrations up by running them (both
streams to head), then installs it: the tables a test sees are the migrations' tables."""

from __future__ import annotations

from sqlalchemy import text

from sqla_tenancy.testing.plugin import _migrate

from .conftest import Project


def test_the_plugin_runs_the_projects_migrations(project: Project) -> None:
    tenancy = project.tenancy
    with tenancy.admin_engine.connect() as conn:
        assert conn.execute(text("select to_regclass('projects')")).scalar() is None  # not yet
    _migrate(tenancy)
    with tenancy.admin_engine.connect() as conn:
        assert conn.execute(text("select to_regclass('projects')")).scalar() == "projects"
        versions = {
            stream: sorted(conn.execute(text(f"select version_num from tenancy.alembic_{stream}")).scalars())
            for stream in ("infrastructure", "tenant")
        }
    assert versions == {stream: sorted(project.heads(stream)) for stream in versions}
    assert [t.slug for t in tenancy.list_tenants()] == ["default"]  # installed
