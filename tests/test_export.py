"""Per-tenant export: a file the customer can be handed, restorable into an empty database."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from sqla_tenancy import Tenancy, tenant_context
from sqla_tenancy.testing import TestServer, find_bindir

from .models import Project, Task, User


def seed(tenancy: Tenancy, placement: str) -> None:
    for slug, count in (("acme", 3), ("globex", 2)):
        tenancy.create_tenant(slug, placement=placement)
        with tenant_context(slug), tenancy.sessionmaker()() as s:
            for i in range(count):
                project = Project(name=f"{slug}-project-{i}")
                s.add(project)
                s.flush()
                s.add(Task(project_id=project.id, title=f"{slug}-task-{i}"))
            s.add(User(email=f"owner@{slug}.test"))
            s.commit()


def restore(server: TestServer, dump: Path) -> str:
    database = server.create_database()
    url = server.superuser_url
    proc = subprocess.run(
        [
            str(find_bindir() / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            str(dump),
            "-h",
            url.host or "",
            "-p",
            str(url.port),
            "-U",
            url.username or "",
            "-d",
            database,
        ],
        env={**os.environ, "PGPASSWORD": url.password or ""},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return database


@pytest.mark.parametrize("placement", ["shared", "schema", "database"])
def test_export_restores_exactly_one_tenants_rows(
    tenancy: Tenancy, tenancy_server: TestServer, tmp_path: Path, placement: str
) -> None:
    if placement == "database":
        tenancy.prepare_server(tenancy_server.superuser_url)
    seed(tenancy, placement)
    acme = tenancy.get_tenant("acme")
    globex = tenancy.get_tenant("globex")
    dump = tenancy.export_tenant("acme", tmp_path / "acme.sql")

    content = dump.read_text()
    assert "globex" not in content
    assert str(globex.id) not in content
    assert "USER MAPPING" not in content and "password" not in content.lower()

    with tenant_context("acme"), tenancy.connect() as conn:
        expected = {
            "projects": conn.execute(text("select id, name, tenant_id from projects order by id")).all(),
            "tasks": conn.execute(text("select id, title, project_id from tasks order by id")).all(),
            "auth.users": conn.execute(text("select id, email, tenant_id from auth.users")).all(),
        }
        conn.rollback()
    assert len(expected["projects"]) == 3 and len(expected["auth.users"]) == 1

    database = restore(tenancy_server, dump)
    engine = create_engine(tenancy_server.superuser_url.set(database=database))
    try:
        with engine.connect() as conn:
            if placement == "schema":
                conn.execute(text(f'set search_path = "{acme.location["schema"]}"'))
            restored = {
                "projects": conn.execute(text("select id, name, tenant_id from projects order by id")).all(),
                "tasks": conn.execute(text("select id, title, project_id from tasks order by id")).all(),
                "auth.users": conn.execute(text("select id, email, tenant_id from auth.users")).all(),
            }
            assert restored == expected
            # the sequences continue after the restored rows
            conn.execute(text(f"select set_config('app.current_tenant_id', '{acme.id}', false)"))
            new_id = conn.execute(text("insert into projects (name) values ('next') returning id")).scalar()
            assert new_id == max(r.id for r in expected["projects"]) + 1
    finally:
        engine.dispose()


def test_export_of_unknown_tenant(tenancy: Tenancy, tmp_path: Path) -> None:
    from sqla_tenancy import TenantNotFound

    with pytest.raises(TenantNotFound):
        tenancy.export_tenant("nobody", tmp_path / "x.sql")
    assert not (tmp_path / "x.sql").exists()
