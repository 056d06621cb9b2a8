"""The documented migration of existing tables to tenant keys (docs/migrations.md, "Moving
existing tables to tenant keys"), run as written: the SQL and the revisions are read from the page,
so the documentation cannot drift from what works."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import exc, select, text

from alembic_ext.versions import INFRASTRUCTURE, TENANT
from sqla_tenancy import tenant_context
from tests.models import Project as ProjectRow
from tests.models import Task, User

from .conftest import Project
from .test_keys_autogenerate import OLD_TENANT_TABLES, constraints, without_initial_revisions

PAGE = Path(__file__).parents[2] / "docs" / "migrations.md"

#: the infrastructure tables as they were: a login e-mail unique across tenants
OLD_INFRASTRUCTURE_TABLES = """
op.create_table(
    "plans",
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("name", sa.Text(), nullable=False),
    schema="auth",
)
op.create_table(
    "users",
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("email", sa.Text(), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    sa.Column("tenant_id", sa.UUID(), server_default=sa.text("tenancy.current_tenant_id()"), nullable=False),
    schema="auth",
)
op.create_index("ix_auth_users_tenant_id", "users", ["tenant_id"], schema="auth")
op.enable_tenant_rls("users", schema="auth")
"""


def documented(name: str) -> str:
    """The fenced block that follows ``<!-- migration-test: name -->`` on the page."""
    match = re.search(rf"<!-- migration-test: {name} -->\n```\w*\n(.*?)```", PAGE.read_text(), re.S)
    assert match, f"docs/migrations.md has no block marked {name!r}"
    return match.group(1)


def functions(source: str) -> tuple[str, str]:
    """The bodies of a documented revision's upgrade() and downgrade()."""
    bodies = {
        node.name: "\n".join(ast.unparse(statement) for statement in node.body)
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef)
    }
    return bodies["upgrade"], bodies["downgrade"]


def test_the_documented_migration_moves_existing_tables_to_tenant_keys(project: Project) -> None:
    tenancy = project.tenancy
    without_initial_revisions(project)
    project.add_revision(INFRASTRUCTURE, OLD_INFRASTRUCTURE_TABLES, message="old users")
    project.add_revision(TENANT, OLD_TENANT_TABLES, message="old tables")
    command.upgrade(project.config(), "head")
    acme, globex = tenancy.create_tenant("acme"), tenancy.create_tenant("globex")
    Session = tenancy.sessionmaker()
    with tenant_context(acme), Session() as s:
        project_row = ProjectRow(name="acme's")
        s.add_all([project_row, User(email="bob@x.test")])
        s.flush()
        s.add(Task(project_id=project_row.id, title="acme's task"))
        s.commit()
        acme_project = project_row.id
    with tenant_context(globex), Session() as s:  # the old keys let it through
        s.add(Task(project_id=acme_project, title="intruder"))
        s.commit()

    # step 2: the violations, then their resolution, as the admin role
    with tenancy.admin_engine.begin() as admin:
        found = admin.execute(text(documented("violations"))).all()
        assert [(row.tenant_id, row.project_tenant_id) for row in found] == [(globex.id, acme.id)]
        admin.execute(text(documented("resolve")))
        assert admin.execute(text(documented("violations"))).all() == []

    # step 3 and 4: the documented revisions, then the models and the database agree
    for stream, block in ((TENANT, "tenant-revision"), (INFRASTRUCTURE, "infrastructure-revision")):
        upgrade, downgrade = functions(documented(block))
        project.add_revision(stream, upgrade, downgrade=downgrade, message="tenant keys")
    command.upgrade(project.config(), "head")
    command.check(project.config())
    assert set(constraints(project, "tasks")) == {"tasks_tenant_id_project_id_fkey", "tasks_tenant_key"}
    assert set(constraints(project, "auth.users")) == {"users_tenant_id_email_key", "users_tenant_key"}

    with tenant_context(globex), Session() as s:
        s.add(Task(project_id=acme_project, title="intruder"))
        with pytest.raises(exc.IntegrityError, match="foreign key"):
            s.commit()
    with tenant_context(globex), Session() as s:
        s.add(User(email="bob@x.test"))  # acme's address: no longer an error, nor a hint
        s.commit()
    with tenant_context(acme), Session() as s:
        assert s.scalars(select(Task.title)).all() == ["acme's task"]

    # and back: the documented downgrades restore the old constraints (no shared address yet)
    with tenant_context(globex), Session() as s:
        s.delete(s.scalars(select(User)).one())
        s.commit()
    command.downgrade(project.config(stream=TENANT), "-1")
    command.downgrade(project.config(stream=INFRASTRUCTURE), "-1")
    assert set(constraints(project, "tasks")) == {"tasks_project_id_fkey"}
    assert set(constraints(project, "auth.users")) == {"users_email_key"}
