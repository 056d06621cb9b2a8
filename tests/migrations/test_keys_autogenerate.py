"""Autogenerate and tenant keys: the composite keys are rendered and created, existing tables are
moved to them in an order PostgreSQL accepts, and an unsafe key is refused before any revision is
written (``alembic check`` included)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from alembic import command
from sqlalchemy import Index, MetaData, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_ext.versions import INFRASTRUCTURE, TENANT
from sqla_tenancy import Tenancy, TenantScoped, UnsafeKeyError, tenant_foreign_key
from tests.conftest import SECRET

from .conftest import Project

#: the test model's tables as an application had them before tenant keys: plain keys
OLD_TENANT_TABLES = """
op.create_table(
    "projects",
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("tenant_id", sa.UUID(), server_default=sa.text("tenancy.current_tenant_id()"), nullable=False),
    info={"sqla_tenancy.anonymous": True},
)
op.create_index("ix_projects_tenant_id", "projects", ["tenant_id"])
op.enable_tenant_rls("projects")
op.create_table(
    "tasks",
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    sa.Column("title", sa.Text(), nullable=False),
    sa.Column("tenant_id", sa.UUID(), server_default=sa.text("tenancy.current_tenant_id()"), nullable=False),
)
op.create_index("ix_tasks_tenant_id", "tasks", ["tenant_id"])
op.enable_tenant_rls("tasks")
"""


def revision_source(project: Project, stream: str, message: str) -> str:
    (path,) = (project.root / "migrations" / stream).glob(f"*{message.replace(' ', '_')}.py")
    return path.read_text()


def constraints(project: Project, table: str) -> dict[str, str]:
    """``name -> definition`` of the table's foreign keys and unique constraints, as PostgreSQL
    has them."""
    with project.tenancy.admin_engine.connect() as conn:
        rows = conn.execute(
            text(
                "select conname, pg_get_constraintdef(oid) from pg_constraint "
                "where conrelid = CAST(:t AS regclass) and contype in ('f', 'u')"
            ),
            {"t": table},
        ).all()
    return {name: definition for name, definition in rows}


def without_initial_revisions(project: Project) -> None:
    for stream in (INFRASTRUCTURE, TENANT):
        for path in (project.root / "migrations" / stream).glob("*initial.py"):
            path.unlink()


def test_autogenerate_renders_the_tenant_keys_and_upgrade_creates_them(migrated: Project) -> None:
    tenant = revision_source(migrated, TENANT, "initial")
    assert (
        "sa.ForeignKeyConstraint(['tenant_id', 'project_id'], ['projects.tenant_id', 'projects.id'], "
        "name='tasks_tenant_id_project_id_fkey', ondelete='CASCADE')" in tenant
    )
    assert "sa.UniqueConstraint('tenant_id', 'id', name='projects_tenant_key')" in tenant
    infrastructure = revision_source(migrated, INFRASTRUCTURE, "initial")
    assert "sa.UniqueConstraint('tenant_id', 'email', name='users_tenant_id_email_key')" in infrastructure
    assert constraints(migrated, "tasks") == {
        "tasks_tenant_id_project_id_fkey": "FOREIGN KEY (tenant_id, project_id) "
        "REFERENCES projects(tenant_id, id) ON DELETE CASCADE",
        "tasks_tenant_key": "UNIQUE (tenant_id, id)",
    }
    assert constraints(migrated, "auth.users") == {
        "users_tenant_id_email_key": "UNIQUE (tenant_id, email)",
        "users_tenant_key": "UNIQUE (tenant_id, id)",
    }
    command.check(migrated.config())  # the keys as created are the keys of the models


def test_autogenerate_and_check_refuse_an_unsafe_key(
    migrated: Project, tenancy_factory: Callable[..., Tenancy]
) -> None:
    metadata = MetaData()
    for table in migrated.tenancy.metadata.tables.values():
        table.to_metadata(metadata)
    Index("projects_name_idx", metadata.tables["projects"].c.name, unique=True)
    cfg = migrated.config()
    cfg.attributes["tenancy"] = tenancy_factory(
        metadata, infrastructure_schemas=["auth"], secret_key=SECRET, migrations=str(migrated.ini)
    )
    before = sorted(p.name for p in migrated.root.rglob("*.py"))
    with pytest.raises(
        UnsafeKeyError, match=r"Index\('projects_name_idx', 'tenant_id', 'name', unique=True\)"
    ):
        command.revision(cfg, "unsafe", autogenerate=True)
    assert sorted(p.name for p in migrated.root.rglob("*.py")) == before
    with pytest.raises(UnsafeKeyError, match="UNIQUE INDEX projects_name_idx"):
        command.check(cfg)


def test_autogenerate_moves_existing_tables_to_tenant_keys(project: Project) -> None:
    without_initial_revisions(project)
    project.add_revision(TENANT, OLD_TENANT_TABLES, message="old tables")
    command.upgrade(project.config(stream=TENANT), "head")
    assert "tasks_project_id_fkey" in constraints(project, "tasks")

    command.revision(project.config(stream=TENANT), "tenant keys", autogenerate=True)
    source = revision_source(project, TENANT, "tenant keys")
    upgrade = source[source.index("def upgrade") : source.index("def downgrade")]
    lines = [line.strip() for line in upgrade.splitlines() if line.strip().startswith("op.")]
    assert lines == [
        "op.drop_constraint(op.f('tasks_project_id_fkey'), 'tasks', type_='foreignkey')",
        "op.create_unique_constraint('projects_tenant_key', 'projects', ['tenant_id', 'id'])",
        "op.create_unique_constraint('tasks_tenant_key', 'tasks', ['tenant_id', 'id'])",
        "op.create_foreign_key('tasks_tenant_id_project_id_fkey', 'tasks', 'projects', "
        "['tenant_id', 'project_id'], ['tenant_id', 'id'], ondelete='CASCADE')",
    ]
    command.upgrade(project.config(stream=TENANT), "head")
    assert set(constraints(project, "tasks")) == {"tasks_tenant_id_project_id_fkey", "tasks_tenant_key"}
    command.check(project.config(stream=TENANT))
    command.downgrade(project.config(stream=TENANT), "-1")  # and back, by name
    assert set(constraints(project, "tasks")) == {"tasks_project_id_fkey"}


# A referencing table that sorts before the table it references, and a new table referencing an
# existing one: Alembic's own order would create the foreign keys before their unique targets.
OLD_BLOG_TABLES = """
op.create_table(
    "posts",
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("tenant_id", sa.UUID(), server_default=sa.text("tenancy.current_tenant_id()"), nullable=False),
)
op.enable_tenant_rls("posts")
op.create_table(
    "comments",
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("post_id", sa.Integer(), sa.ForeignKey("posts.id"), nullable=False),
    sa.Column("tenant_id", sa.UUID(), server_default=sa.text("tenancy.current_tenant_id()"), nullable=False),
)
op.enable_tenant_rls("comments")
"""


def blog_model() -> MetaData:
    class Base(DeclarativeBase):
        pass

    class Post(TenantScoped, Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Comment(TenantScoped, Base):
        __tablename__ = "comments"
        __table_args__ = (tenant_foreign_key(["post_id"], ["posts.id"]),)
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[int] = mapped_column()

    class Attachment(TenantScoped, Base):  # new in this revision
        __tablename__ = "attachments"
        __table_args__ = (tenant_foreign_key(["post_id"], ["posts.id"], ondelete="CASCADE"),)
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[int] = mapped_column()
        url: Mapped[str] = mapped_column(Text)

    return Base.metadata


def test_autogenerated_key_migrations_run_whatever_the_table_names(
    project: Project, tenancy_factory: Callable[..., Tenancy]
) -> None:
    without_initial_revisions(project)
    project.add_revision(TENANT, OLD_BLOG_TABLES, message="old blog")
    blog = tenancy_factory(blog_model(), secret_key=SECRET, migrations=str(project.ini))
    project.tenancy = blog
    command.upgrade(project.config(stream=TENANT), "head")
    command.revision(project.config(stream=TENANT), "tenant keys", autogenerate=True)
    command.upgrade(project.config(stream=TENANT), "head")  # PostgreSQL accepted the order
    assert constraints(project, "comments") == {
        "comments_tenant_id_post_id_fkey": "FOREIGN KEY (tenant_id, post_id) REFERENCES posts(tenant_id, id)",
        "comments_tenant_key": "UNIQUE (tenant_id, id)",
    }
    assert "attachments_tenant_id_post_id_fkey" in constraints(project, "attachments")
    command.check(project.config(stream=TENANT))
    command.downgrade(project.config(stream=TENANT), "-1")
    assert set(constraints(project, "comments")) == {"comments_post_id_fkey"}
