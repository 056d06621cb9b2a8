"""The Celery application of the Celery integration tests, run by a real worker process.

The test process imports it to send tasks (and configures the broker itself); the worker imports it
with the environment variables below set, and then builds its own :class:`Tenancy` on the tests'
database, with no default tenant: a query with no tenant in context raises TenantRequired.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from sqlalchemy import exc, select

from sqla_tenancy import Tenancy, current_tenant
from sqla_tenancy.context import current_is_anonymous, current_platform_reason, current_tenant_ref
from sqla_tenancy.integrations.celery import TenantTask, install_celery
from tests.models import INFRASTRUCTURE, Base, Project, Task

BROKER_ENV = "SQLA_TENANCY_CELERY_BROKER"
APP_URL_ENV = "SQLA_TENANCY_CELERY_APP_URL"
ADMIN_URL_ENV = "SQLA_TENANCY_CELERY_ADMIN_URL"
PREFIX_ENV = "SQLA_TENANCY_CELERY_NAME_PREFIX"

app = Celery(__name__, task_cls=TenantTask)
app.conf.update(
    broker_url=os.environ.get(BROKER_ENV, "memory://"),
    result_backend=os.environ.get(BROKER_ENV, "cache+memory://"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
)

tenancy: Tenancy | None = None
if os.environ.get(APP_URL_ENV):  # the worker process
    tenancy = Tenancy(
        os.environ[APP_URL_ENV],
        metadata=Base.metadata,
        infrastructure_schemas=INFRASTRUCTURE,
        admin_url=os.environ[ADMIN_URL_ENV],
        name_prefix=os.environ[PREFIX_ENV],
        default_tenant=None,
    )
    install_celery(app, tenancy=tenancy)


def _tenancy() -> Tenancy:
    assert tenancy is not None, "this task runs in the test worker only"
    return tenancy


def _scope() -> dict[str, Any]:
    ref = current_tenant_ref()
    return {"tenant_ref": None if ref is None else str(ref), "platform": current_platform_reason()}


@app.task
def add_project(name: str) -> dict[str, Any]:
    """Write a project for the message's tenant, then read every project that tenant sees."""
    tenant = current_tenant(_tenancy())
    assert tenant is not None
    with _tenancy().sessionmaker()() as session:
        session.add(Project(name=name))
        session.commit()
        rows = session.execute(select(Project.name, Project.tenant_id)).all()
    return {
        **_scope(),
        "slug": tenant.slug,
        "names": sorted(row.name for row in rows),
        "tenant_ids": sorted({str(row.tenant_id) for row in rows}),
    }


@app.task
def scope() -> dict[str, Any]:
    """The context the task runs in (tenant required; the body touches no database)."""
    return _scope()


@app.task(tenant_required=False)
def scope_optional() -> dict[str, Any]:
    """The context the task runs in, which may be none."""
    return _scope()


@app.task
def all_project_names() -> dict[str, Any]:
    """Every project the context lets the task see (all tenants' in platform context)."""
    with _tenancy().sessionmaker()() as session:
        names = sorted(session.scalars(select(Project.name)))
    return {**_scope(), "names": names}


@app.task
def anonymous_reads() -> dict[str, Any]:
    """What the task's database role may read: projects (opted in), tasks (private)."""
    with _tenancy().sessionmaker()() as session:
        names = sorted(session.scalars(select(Project.name)))
    with _tenancy().sessionmaker()() as session:
        try:
            session.execute(select(Task.title)).all()
            tasks = "readable"
        except exc.DBAPIError as error:  # the worker reports what PostgreSQL said
            tasks = type(getattr(error, "orig", error)).__name__
    return {**_scope(), "anonymous": current_is_anonymous(), "names": names, "tasks": tasks}


@app.task
def fail(message: str) -> None:
    """Fail inside the message's tenant context."""
    assert current_tenant_ref() is not None
    raise RuntimeError(message)


@app.task
def send_child() -> str:
    """Send :func:`scope` from inside this task; the child's id (the child is not awaited here)."""
    return str(scope.delay().id)


@app.task
def scope_after(previous: Any) -> dict[str, Any]:
    """The context of a task run as the next link of a chain (sent by the worker)."""
    return _scope()


@app.task
def collect(parts: list[Any]) -> dict[str, Any]:
    """A chord callback (sent by the worker that finished the last part): its context, and the parts'."""
    return {**_scope(), "parts": parts}


@app.task(bind=True, max_retries=1)
def retry_once(self: TenantTask) -> dict[str, Any]:
    """Retry once (the worker sends the retry), then answer the context the retry runs in."""
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return {**_scope(), "anonymous": current_is_anonymous(), "retries": self.request.retries}


class RecordsFailure(TenantTask):
    """Writes a project named after the task's argument when the task fails."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        with _tenancy().sessionmaker()() as session:
            session.add(Project(name=args[0]))
            session.commit()


@app.task(base=RecordsFailure)
def fail_and_record(name: str) -> None:
    """Fail; the failure handler records ``name`` in the task's tenant."""
    raise RuntimeError(name)
