"""The Alembic extension on a distributed main database: autogenerate writes the distribution of
new tables into the revisions (tenant tables distributed by tenant_id and colocated, global
infrastructure as reference tables), ``alembic upgrade`` and the fleet runner
(``sqla-tenancy migrate``) apply it, and the tenants stay isolated on the workers."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, Table, select, text
from sqlalchemy.engine import URL

from alembic_ext import init_project
from alembic_ext.versions import INFRASTRUCTURE, TENANT
from sqla_tenancy import Tenancy, tenant_context
from sqla_tenancy.testing.citus import CitusCluster

from .app import SECRET
from .models import Base, extended_metadata

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(sys.executable).parent / "sqla-tenancy")


@dataclass
class CitusProject:
    root: Path
    ini: Path
    urls: dict[str, URL]
    prefix: str
    tenancies: list[Tenancy]

    def tenancy(self, metadata: MetaData = Base.metadata) -> Tenancy:
        tenancy = Tenancy(
            self.urls["app"],
            admin_url=self.urls["admin"],
            metadata=metadata,
            infrastructure_schemas=["billing"],
            name_prefix=self.prefix,
            migrations=str(self.ini),
            distributed=True,
            registry_listen=False,
            secret_key=SECRET,
        )
        self.tenancies.append(tenancy)
        return tenancy

    def config(self, tenancy: Tenancy, **x: str) -> Config:
        cfg = Config(str(self.ini))
        cfg.attributes["tenancy"] = tenancy
        if x:
            import argparse

            cfg.cmd_opts = argparse.Namespace(x=[f"{k}={v}" for k, v in x.items()])
        return cfg

    def revision(self, stream: str, message: str) -> str:
        (path,) = (self.root / "migrations" / stream).glob(f"*{message.replace(' ', '_')}.py")
        return path.read_text()

    def env(self, models: str = "initial") -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CITUS_APP_URL": self.urls["app"].render_as_string(hide_password=False),
            "CITUS_APP_ADMIN_URL": self.urls["admin"].render_as_string(hide_password=False),
            "CITUS_APP_PREFIX": self.prefix,
            "CITUS_APP_INI": str(self.ini),
            "CITUS_APP_MODELS": models,
        }


@pytest.fixture
def project(tmp_path: Path, citus_database: dict[str, URL]) -> Iterator[CitusProject]:
    ini = tmp_path / "alembic.ini"
    init_project("migrations", app="tests.citus.app:tenancy", ini=ini)
    project = CitusProject(tmp_path, ini, citus_database, f"m{secrets.token_hex(3)}", [])
    tenancy = project.tenancy()
    command.upgrade(project.config(tenancy), "head")  # the empty roots: the registry
    command.revision(project.config(tenancy), "initial", autogenerate=True)
    yield project
    for t in project.tenancies:
        t.dispose()


def citus_tables(tenancy: Tenancy) -> dict[str, tuple[str, str | None, int]]:
    """``table -> (citus_table_type, distribution column, colocation id)`` as Citus has them."""
    with tenancy.admin_engine.connect() as conn:
        rows = conn.execute(
            text(
                "select table_name::text, citus_table_type, distribution_column, colocation_id "
                "from citus_tables"
            )
        ).all()
    return {
        name: (kind, column if column != "<none>" else None, colocation)
        for name, kind, column, colocation in rows
    }


def upgrade_lines(source: str) -> list[str]:
    body = source[source.index("def upgrade") : source.index("def downgrade")]
    return [line.strip() for line in body.splitlines() if line.strip().startswith("op.")]


def test_autogenerate_writes_the_distribution_and_upgrade_applies_it(project: CitusProject) -> None:
    tenant = upgrade_lines(project.revision(TENANT, "initial"))
    # after each table's DDL and RLS; referenced tables first
    assert tenant[-2:] == ["op.distribute_tenant_table('projects')", "op.distribute_tenant_table('tasks')"]
    assert tenant.index("op.enable_tenant_rls('tasks')") < tenant.index(
        "op.distribute_tenant_table('projects')"
    )
    assert upgrade_lines(project.revision(INFRASTRUCTURE, "initial"))[-1] == (
        "op.make_reference_table('plans', schema='billing')"
    )
    tenancy = project.tenancy()
    command.upgrade(project.config(tenancy), "head")
    found = citus_tables(tenancy)
    assert found["projects"][:2] == ("distributed", "tenant_id") and found["tasks"][:2] == (
        "distributed",
        "tenant_id",
    )
    assert found["projects"][2] == found["tasks"][2]
    assert found["billing.plans"][0] == "reference"
    command.check(project.config(tenancy))  # nothing left to distribute

    # a model change: a new tenant table and a new global infrastructure table
    extended = project.tenancy(extended_metadata())
    command.revision(project.config(extended), "notes and currencies", autogenerate=True)
    tenant = upgrade_lines(project.revision(TENANT, "notes and currencies"))
    assert tenant[0].startswith("op.create_table('notes',")
    assert tenant[-1] == "op.distribute_tenant_table('notes')"
    source = project.revision(TENANT, "notes and currencies")
    downgrade = source[source.index("def downgrade") :]
    assert "undistribute_table" not in downgrade  # the table is dropped, no copy back first
    assert upgrade_lines(project.revision(INFRASTRUCTURE, "notes and currencies"))[-1] == (
        "op.make_reference_table('currencies', schema='billing')"
    )
    command.upgrade(project.config(extended), "head")
    found = citus_tables(extended)
    assert found["notes"][:2] == ("distributed", "tenant_id") and found["notes"][2] == found["projects"][2]
    assert found["billing.currencies"][0] == "reference"
    command.check(project.config(extended))

    # tenants on the migrated tables: each sees its own notes, on the workers
    for slug in ("acme", "globex"):
        extended.create_tenant(slug)
    notes: Table = extended.metadata.tables["notes"]
    projects: Table = extended.metadata.tables["projects"]
    for slug in ("acme", "globex"):
        with tenant_context(slug), extended.connect() as conn:
            project_id = conn.execute(projects.insert().values(name=slug).returning(projects.c.id)).scalar()
            conn.execute(notes.insert().values(project_id=project_id, body=f"{slug} note"))
            conn.commit()
    for slug in ("acme", "globex"):
        with tenant_context(slug), extended.connect() as conn:
            assert conn.execute(select(notes.c.body)).scalars().all() == [f"{slug} note"]

    # one step back on the tenant stream drops the table, distributed or not
    command.downgrade(project.config(extended, stream=TENANT), "-1")
    assert "notes" not in citus_tables(extended)


def test_an_existing_local_table_is_distributed_by_the_next_revision(project: CitusProject) -> None:
    """A project that moves to Citus: its tables exist as plain tables of the coordinator; the
    next autogenerated revision distributes them (and its downgrade undistributes them)."""
    tenancy = project.tenancy()
    for stream in (TENANT, INFRASTRUCTURE):
        path = next((project.root / "migrations" / stream).glob("*initial.py"))
        path.write_text(
            path.read_text()
            .replace("    op.distribute_tenant_table", "    pass  # ")
            .replace("    op.make_reference_table", "    pass  # ")
        )
    command.upgrade(project.config(tenancy), "head")
    assert "projects" not in citus_tables(tenancy)
    command.revision(project.config(tenancy), "to citus", autogenerate=True)
    assert upgrade_lines(project.revision(TENANT, "to citus")) == [
        "op.distribute_tenant_table('projects')",
        "op.distribute_tenant_table('tasks')",
    ]
    source = project.revision(TENANT, "to citus")
    assert (
        "op.undistribute_table('tasks', tenant_column='tenant_id')" in source[source.index("def downgrade") :]
    )
    command.upgrade(project.config(tenancy), "head")
    found = citus_tables(tenancy)
    assert found["projects"][0] == found["tasks"][0] == "distributed"
    assert found["billing.plans"][0] == "reference"
    # and back: the tables connected by foreign keys return to the coordinator together
    command.downgrade(project.config(tenancy, stream=TENANT), "-1")
    assert {"projects", "tasks"}.isdisjoint(citus_tables(tenancy))
    assert "billing.plans" in citus_tables(tenancy)


def test_offline_scripts_carry_the_distribution(project: CitusProject) -> None:
    buffer = io.StringIO()
    cfg = project.config(project.tenancy(), stream=INFRASTRUCTURE)
    cfg.output_buffer = buffer
    command.upgrade(cfg, "head", sql=True)
    assert """SELECT create_reference_table('"billing"."plans"')""" in buffer.getvalue()


def migrate(project: CitusProject, report: Path) -> dict[str, Any]:
    """``sqla-tenancy migrate`` as a user runs it, on the extended models; its JSON report."""
    result = subprocess.run(
        [SCRIPT, "migrate", "-c", str(project.ini), "--no-progress", "--report", str(report)],
        cwd=ROOT,
        env=project.env("extended"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written: dict[str, Any] = json.loads(report.read_text())
    return written


def test_the_fleet_runner_migrates_a_distributed_database(project: CitusProject, tmp_path: Path) -> None:
    tenancy = project.tenancy()
    command.upgrade(project.config(tenancy), "head")
    tenancy.create_tenant("acme")
    command.revision(project.config(project.tenancy(extended_metadata())), "notes", autogenerate=True)
    written = migrate(project, tmp_path / "report.json")
    assert written["infrastructure"]["status"] == "upgraded"
    assert [(o["location"], o["status"]) for o in written["locations"]] == [("main", "upgraded")]
    found = citus_tables(tenancy)
    assert found["notes"][:2] == ("distributed", "tenant_id") and found["notes"][2] == found["projects"][2]
    assert found["billing.currencies"][0] == "reference"
    assert tenancy.get_tenant("acme").revision == written["target"]


def test_the_fleet_runner_migrates_schema_tenants_on_citus(
    project: CitusProject, tmp_path: Path, citus: CitusCluster
) -> None:
    """A tenant-stream revision adding a table, applied by the fleet runner to a schema tenant's
    distributed schema: the table is a single-shard table of the schema (its node), the tenant
    uses it, and the shared tenants' table is distributed as before."""
    tenancy = project.tenancy()
    command.upgrade(project.config(tenancy), "head")
    tenancy.create_tenant("acme")
    schema_tenant = tenancy.create_tenant("s_globex", placement="schema")
    for role, password in tenancy.node_logins(schema_tenant):
        citus.authorize(role, password)
    command.revision(project.config(project.tenancy(extended_metadata())), "notes", autogenerate=True)
    written = migrate(project, tmp_path / "report.json")
    schema = schema_tenant.location["schema"]
    assert {(o["location"], o["kind"], o["status"]) for o in written["locations"]} == {
        ("main", "main", "upgraded"),
        ("s_globex", "schema", "upgraded"),
    }
    found = citus_tables(tenancy)
    assert found["notes"][:2] == ("distributed", "tenant_id")
    assert found[f"{schema}.notes"][0] == "schema"
    assert found[f"{schema}.notes"][2] == found[f"{schema}.projects"][2]  # on the schema's node
    extended = project.tenancy(extended_metadata())
    notes: Table = extended.metadata.tables["notes"]
    projects: Table = extended.metadata.tables["projects"]
    with tenant_context("s_globex"), extended.connect() as conn:
        project_id = conn.execute(projects.insert().values(name="g").returning(projects.c.id)).scalar()
        conn.execute(notes.insert().values(project_id=project_id, body="globex note"))
        conn.commit()
    with tenant_context("s_globex"), extended.connect() as conn:
        assert conn.execute(select(notes.c.body)).scalars().all() == ["globex note"]
    assert extended.get_tenant("s_globex").revision == written["target"]
