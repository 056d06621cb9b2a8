"""The application model the test-suite uses: tenant tables plus an infrastructure schema."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_tenancy import TenantScoped, anonymous_readable


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    """Readable by anonymous requests (a tenant's access key); tasks and users are not."""

    __tablename__ = "projects"
    __table_args__ = {"info": anonymous_readable()}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class Task(TenantScoped, Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(Text)


class User(TenantScoped, Base):
    """An infrastructure table: kept once, in the main database's ``auth`` schema."""

    __tablename__ = "users"
    __table_args__ = {"schema": "auth"}

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
