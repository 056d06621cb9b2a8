"""The application model the test-suite uses: tenant tables plus an infrastructure schema."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_tenancy import TenantScoped, anonymous_readable, tenant_foreign_key, tenant_unique


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    """Readable by anonymous requests (a tenant's access key); tasks and users are not."""

    __tablename__ = "projects"
    __table_args__ = {"info": anonymous_readable()}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class Task(TenantScoped, Base):
    """``FOREIGN KEY (tenant_id, project_id) REFERENCES projects (tenant_id, id)``: a task can only
    belong to a project of its own tenant, and a project's deletion cascades within its tenant."""

    __tablename__ = "tasks"
    __table_args__ = (tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int]
    title: Mapped[str] = mapped_column(Text)


class User(TenantScoped, Base):
    """An infrastructure table: kept once, in the main database's ``auth`` schema. E-mail
    addresses are unique per tenant: another tenant's address is no error, and no hint."""

    __tablename__ = "users"
    __table_args__ = (tenant_unique("email"), {"schema": "auth"})

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Plan(Base):
    """A global infrastructure table without tenant_id: the same rows for every tenant."""

    __tablename__ = "plans"
    __table_args__ = {"schema": "auth"}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


INFRASTRUCTURE = ("auth",)
