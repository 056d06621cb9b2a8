"""The models of the Citus suite: global infrastructure (a reference table) and two colocated
tenant tables; :func:`extended_metadata` adds one table of each kind, as a later model change
would (the migration tests autogenerate a revision from it)."""

from __future__ import annotations

from sqlalchemy import Column, Integer, MetaData, PrimaryKeyConstraint, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_tenancy import TenantScoped, anonymous_readable, tenant_foreign_key, tenant_id_column


class Base(DeclarativeBase):
    metadata = MetaData()


class Plan(Base):
    """Global infrastructure (no tenant_id): a reference table on every node."""

    __tablename__ = "plans"
    __table_args__ = {"schema": "billing"}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Project(TenantScoped, Base):
    """Opted in to anonymous reads (the anonymous tests on Citus read it; tasks stay private)."""

    __tablename__ = "projects"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "id"), {"info": anonymous_readable()})

    id: Mapped[int] = mapped_column(autoincrement=True)
    name: Mapped[str]


class Task(TenantScoped, Base):
    __tablename__ = "tasks"
    __table_args__ = (
        PrimaryKeyConstraint("tenant_id", "id"),
        tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),
    )

    id: Mapped[int] = mapped_column(autoincrement=True)
    project_id: Mapped[int]
    title: Mapped[str]


def extended_metadata() -> MetaData:
    """The models plus a new tenant table (``notes``, referencing ``projects``) and a new global
    infrastructure table (``billing.currencies``)."""
    metadata = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    Table(
        "notes",
        metadata,
        Column("id", Integer, autoincrement=True),
        tenant_id_column(),
        Column("project_id", Integer, nullable=False),
        Column("body", Text, nullable=False),
        PrimaryKeyConstraint("tenant_id", "id"),
        tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),
    )
    Table(
        "currencies",
        metadata,
        Column("code", Text, primary_key=True),
        Column("name", Text, nullable=False),
        schema="billing",
    )
    return metadata
