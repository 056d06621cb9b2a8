"""The example API with FastAPI and async sessions: ``create_app(settings)`` builds it;
:mod:`.__main__` serves it with uvicorn.

``TenancyMiddleware`` resolves and checks each request before FastAPI sees it (the same checkpoint
as the Flask app: a bearer token for the tenant, or its access key for read-only anonymous access),
then runs the endpoint inside the tenant's context. ``get_async_session`` hands the endpoint an
``AsyncSession`` that this context routes: to ``acme``'s own database, or to the main database where
row-level security keeps ``globex`` and the default tenant apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from sqla_tenancy import Tenancy
from sqla_tenancy.checkpoint import Admission
from sqla_tenancy.integrations.asgi import (
    TenancyMiddleware,
    get_admission,
    get_async_session,
    openapi_security,
)

from .. import common
from ..common import ApiError, Project, Settings, Task

__all__ = ["create_app"]

SessionDep = Annotated[AsyncSession, Depends(get_async_session)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]

#: Served without tenant resolution or checkpoint (``/dev`` too, when dev tokens are on).
EXEMPT_PATHS = ("/health", "/docs", "/redoc", "/openapi.json")


class NewProject(BaseModel):
    name: str


class NewTask(BaseModel):
    title: str


class TokenRequest(BaseModel):
    tenant: str
    sub: str


# Declares the bearer token, the tenant header and the access key in the OpenAPI schema, so that
# "Authorize" on /docs sends them (the middleware checks them).
api = APIRouter(dependencies=openapi_security())


async def _project(session: AsyncSession, project_id: int) -> Project:
    project = await session.get(Project, project_id)
    if project is None:
        raise common.project_not_found(project_id)
    return project


#: exempt from the checkpoint (EXEMPT_PATHS): no security in the schema
public = APIRouter()


@public.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@api.get("/me")
async def me(session: SessionDep, admission: AdmissionDep) -> dict[str, Any]:
    email = common.subject(admission)
    user = await session.scalar(common.user_query(email)) if email is not None else None
    return common.me_json(admission, user)


@api.get("/projects")
async def list_projects(session: SessionDep, admission: AdmissionDep) -> dict[str, Any]:
    return common.projects_json(admission.tenant, await session.scalars(common.projects_query()))


@api.post("/projects", status_code=201)
async def create_project(new: NewProject, session: SessionDep, admission: AdmissionDep) -> dict[str, Any]:
    common.require_writer(admission)
    project = Project(name=common.clean_text(new.name, "name"))
    session.add(project)
    await session.flush()
    body = {"tenant": admission.tenant.slug, "project": common.project_json(project)}
    await session.commit()
    return body


@api.get("/projects/{project_id}/tasks")
async def list_tasks(project_id: int, session: SessionDep, admission: AdmissionDep) -> dict[str, Any]:
    project = await _project(session, project_id)
    tasks = await session.scalars(common.tasks_query(project_id))
    return common.tasks_json(admission.tenant, project, tasks)


@api.post("/projects/{project_id}/tasks", status_code=201)
async def create_task(
    project_id: int, new: NewTask, session: SessionDep, admission: AdmissionDep
) -> dict[str, Any]:
    common.require_writer(admission)
    title = common.clean_text(new.title, "title")
    project = await _project(session, project_id)
    task = Task(project_id=project.id, title=title, created_by=common.subject(admission))
    session.add(task)
    await session.flush()
    body = {"tenant": admission.tenant.slug, "task": common.task_json(task)}
    await session.commit()
    return body


dev = APIRouter()


@dev.post("/dev/token")
async def dev_token(body: TokenRequest, request: Request) -> dict[str, Any]:
    """DEMO ONLY: a token for whoever asks. Mounted only with ``Settings(dev_tokens=True)``."""
    settings: Settings = request.app.state.settings
    return common.dev_token(settings, body.model_dump())


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return JSONResponse(error.body(), status_code=error.status)


async def _database_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, DBAPIError)
    refusal = common.database_refusal(error)
    if refusal is None:
        raise error
    return await _api_error(request, refusal)


async def _invalid_input(request: Request, error: Exception) -> JSONResponse:
    # The same answer as the Flask app's (400), rather than FastAPI's 422.
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return JSONResponse(ApiError(400, "invalid_input", problems).body(), status_code=400)


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app over the database and secrets in ``settings``; its lifespan disposes the
    :class:`~sqla_tenancy.Tenancy` it owns at shutdown."""
    tenancy: Tenancy = settings.make_tenancy()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await tenancy.dispose_async()

    app = FastAPI(title="sqla-tenancy example (FastAPI)", lifespan=lifespan)
    app.state.settings = settings
    app.state.tenancy = tenancy
    app.add_middleware(
        TenancyMiddleware,
        tenancy=tenancy,
        checkpoint=settings.make_checkpoint(),
        resolvers=common.RESOLVERS,
        exempt_paths=[*EXEMPT_PATHS, *(["/dev"] if settings.dev_tokens else [])],
    )
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(RequestValidationError, _invalid_input)
    app.include_router(public)
    app.include_router(api)
    if settings.dev_tokens:
        app.include_router(dev)
    return app
