"""factory-boy factories writing into the active tenant (sqla_tenancy.testing.factories)."""

from __future__ import annotations

import factory
import pytest
from sqlalchemy import ForeignKeyConstraint, select
from sqlalchemy.orm import DeclarativeBase, Mapped, relationship

from sqla_tenancy import Tenancy, Tenant, TenantRequired, platform_context, tenant_context
from sqla_tenancy.testing.factories import TenantFactory, TenantModelFactory

from .models import Project, Task


class _Related(DeclarativeBase):
    """Project and Task's tables, mapped with a relationship (the suite's models have none).
    tests/test_isolation.py maps the same tables with relationships of its own: ``overlaps``
    tells SQLAlchemy that the two mappings never write through one session."""


#: the relationships of the two mappings of the same tables (here and in tests/test_isolation.py)
OVERLAPS = "tasks,eager_tasks,project"


class ProjectR(_Related):
    __table__ = Project.__table__
    tasks: Mapped[list[TaskR]] = relationship(back_populates="project", overlaps=OVERLAPS)


class TaskR(_Related):
    __table__ = Task.__table__
    project: Mapped[ProjectR] = relationship(back_populates="tasks", overlaps=OVERLAPS)


assert any(isinstance(c, ForeignKeyConstraint) for c in Task.__table__.constraints)


class ProjectFactory(TenantModelFactory):
    class Meta:
        model = Project

    name = factory.Sequence(lambda n: f"project {n}")


class ProjectRFactory(TenantModelFactory):
    class Meta:
        model = ProjectR

    name = factory.Sequence(lambda n: f"related project {n}")


class TaskRFactory(TenantModelFactory):
    class Meta:
        model = TaskR

    title = factory.Sequence(lambda n: f"task {n}")
    project = factory.SubFactory(ProjectRFactory)


def names(tenancy: Tenancy) -> list[str]:
    with tenancy.sessionmaker()() as session:
        return sorted(session.scalars(select(Project.name)))


@pytest.mark.tenant(placement="all")
def test_create_batch_writes_the_active_tenants_rows(
    app_tenancy: Tenancy, tenant: Tenant, make_tenant, tenant_placement: str
) -> None:
    projects = ProjectFactory.create_batch(5)
    assert {p.tenant_id for p in projects} == {tenant.id}  # filled from the context
    assert len(names(app_tenancy)) == 5
    other = make_tenant(placement=tenant_placement)
    with tenant_context(other):
        assert names(app_tenancy) == []
        ProjectFactory()
        assert len(names(app_tenancy)) == 1
    assert len(names(app_tenancy)) == 5


@pytest.mark.tenant(placement="all")
def test_sub_factories_and_relationships_stay_in_the_tenant(app_tenancy: Tenancy, tenant: Tenant) -> None:
    task = TaskRFactory()
    assert task.tenant_id == tenant.id and task.project.tenant_id == tenant.id
    assert task.project_id == task.project.id
    with app_tenancy.sessionmaker()() as session:
        (loaded,) = session.scalars(select(TaskR)).all()
        assert loaded.project.name == task.project.name


def test_factories_refuse_to_create_outside_any_tenant(app_tenancy: Tenancy) -> None:
    # the default tenant exists, yet a factory does not fall back to it
    with pytest.raises(TenantRequired, match="outside any tenant"):
        ProjectFactory()
    with platform_context("test"), pytest.raises(TenantRequired, match="platform_context"):
        ProjectFactory()


@pytest.mark.parametrize("placement", ["shared", "schema", "database"])
def test_tenant_factory_provisions_and_cleans_up(
    app_tenancy: Tenancy, tenant_factory, placement: str
) -> None:
    made = tenant_factory(placement=placement)
    assert made.strategy == placement and made.status == "active"
    with tenant_context(made):
        ProjectFactory()
        assert len(names(app_tenancy)) == 1
    tenant_factory.cleanup()
    assert made.slug not in {t.slug for t in app_tenancy.list_tenants()}
    with pytest.raises(Exception, match="build"):
        TenantFactory.build()


def test_the_seeding_recipe(tenancy_factory, tenancy_server) -> None:
    """docs/testing.md, "Seeding a development database", on the suite's model."""
    from sqla_tenancy.testing.factories import bind_factories

    from .conftest import SECRET
    from .models import INFRASTRUCTURE, Base

    tenancy = tenancy_factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE, secret_key=SECRET)
    tenancy.install()
    tenancy.prepare_server(tenancy_server.superuser_url)
    bind_factories(tenancy)
    try:
        for slug, placement in [("acme", "database"), ("globex", "shared"), ("initech", "schema")]:
            TenantFactory(slug=slug, placement=placement)
            with tenant_context(slug):
                for project in ProjectRFactory.create_batch(3):
                    TaskRFactory.create_batch(5, project=project)
        for slug in ("acme", "globex", "initech"):
            with tenant_context(slug), tenancy.sessionmaker()() as session:
                assert len(session.scalars(select(ProjectR)).all()) == 3
                assert len(session.scalars(select(TaskR)).all()) == 15
        TenantFactory.cleanup()
        assert [t.slug for t in tenancy.list_tenants()] == ["default"]
    finally:
        bind_factories(None)
