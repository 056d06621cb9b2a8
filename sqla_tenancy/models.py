"""Declarative helpers for tenant tables."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Column, Table, event, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, Mapper, declared_attr, mapped_column

from .keys import add_tenant_key
from .rls import ANONYMOUS_INFO_KEY, TENANT_ID_INFO_KEY

__all__ = ["TenantScoped", "active_tenant_id", "anonymous_readable", "tenant_id_column"]


def active_tenant_id(tenancy: Any = None) -> uuid.UUID:
    """The id of the tenant queries would run for now (the default tenant when none is active),
    resolved with ``tenancy`` (by default the process's most recent Tenancy)."""
    from .context import active_resolver

    resolver = tenancy.router if tenancy is not None else active_resolver()
    if resolver is None:
        raise RuntimeError("no Tenancy has been created in this process")
    return resolver.current_tenant_id()  # TenantRequired in platform_context()


def _column_default(context: Any) -> uuid.UUID:
    # The router of the engine that runs the insert: right even with several Tenancy objects.
    of_context = getattr(getattr(context, "dialect", None), "tenant_of_context", None)
    if of_context is not None:
        return of_context()  # type: ignore[no-any-return]
    return active_tenant_id()


def tenant_id_column(name: str = "tenant_id") -> Column[uuid.UUID]:
    """A ``tenant_id`` column for Core ``Table`` definitions (what :class:`TenantScoped` adds)."""
    return Column(name, **_column_kwargs())


def _column_kwargs() -> dict[str, Any]:
    return {
        "type_": UUID(as_uuid=True),
        "nullable": False,
        "index": True,
        "default": _column_default,
        # Raw SQL inserts inside a bound transaction get the tenant from the database too.
        "server_default": text("tenancy.current_tenant_id()"),
        "info": {TENANT_ID_INFO_KEY: True},
    }


class TenantScoped:
    """Mixin for declarative models whose rows belong to one tenant.

    Adds ``tenant_id`` (UUID, NOT NULL, indexed), filled from the active tenant on insert, and
    ``UNIQUE (tenant_id, <primary key>)`` named ``<table>_tenant_key``: the target of
    :func:`~sqla_tenancy.tenant_foreign_key` from other tenant tables (PostgreSQL needs a unique
    constraint on exactly the referenced columns). :meth:`Tenancy.install` (and the Alembic
    extension) put row-level security on such tables.

    Keys between tenant tables must include ``tenant_id`` (see :mod:`sqla_tenancy.keys`)::

        class Task(TenantScoped, Base):
            __tablename__ = "tasks"
            __table_args__ = (tenant_foreign_key(["project_id"], ["projects.id"], ondelete="CASCADE"),)
    """

    @declared_attr
    def tenant_id(cls) -> Mapped[uuid.UUID]:
        kwargs = _column_kwargs()
        return mapped_column(kwargs.pop("type_"), **kwargs)


@event.listens_for(TenantScoped, "after_mapper_constructed", propagate=True)
def _add_tenant_key(mapper: Mapper[Any], class_: type[Any]) -> None:
    # A mapper event, not __init_subclass__: it runs for every declarative style (DeclarativeBase,
    # declarative_base(), registry.mapped, Flask-SQLAlchemy's db.Model) once __table__ exists.
    if isinstance(mapper.local_table, Table):
        add_tenant_key(mapper.local_table)


def anonymous_readable(where: str | None = None) -> dict[str, Any]:
    """``Table.info`` that lets anonymous requests (a tenant's access key, or no credential; see
    :func:`~sqla_tenancy.tenant_context`'s ``anonymous``) read the table. Tables are private unless
    opted in: the anonymous database role is refused every other table, and every write.

    ``where`` is a SQL row filter (trusted: it is written into the policy as given), e.g.
    ``"is_public"``; anonymous reads then see the rows the tenant's policies *and* the filter
    allow. A filter needs row-level security, hence a tenant-scoped table. ::

        class Project(TenantScoped, Base):
            __tablename__ = "projects"
            __table_args__ = {"info": anonymous_readable(where="is_public")}

    The grants and policies are made by :meth:`Tenancy.install` and when tenants are provisioned.
    """
    if where is not None and (not isinstance(where, str) or not where.strip()):
        raise ValueError("anonymous_readable(where=...) takes a non-empty SQL condition, e.g. 'is_public'")
    return {ANONYMOUS_INFO_KEY: True if where is None else where}
