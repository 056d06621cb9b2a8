"""The same small application written for Flask, Flask-SQLAlchemy and FastAPI.

Routes (all but ``/probe`` go through tenant resolution and the checkpoint):

``GET /projects``, ``GET /t/<slug>/projects``
    ``{"tenant", "credential", "anonymous", "ref", "names"}``: the project names, read twice with a
    pause in between (the two reads must agree, or the view answers 500).
``GET /tasks``
    ``{"tenant", "credential", "titles"}``: the task titles (a private table: anonymous requests
    get 403 ``permission_denied``, which is PostgreSQL's answer to the anonymous role).
``GET /projects-async`` (FastAPI)
    the same through an ``AsyncSession``.
``GET /stream``
    three JSON lines, each read with a fresh session while the body streams.
``POST /background`` (FastAPI)
    answers at once; a background task then inserts ``<slug>-bg-<marker>``.
``GET /boom``
    runs a query, then raises.
``GET /probe`` (exempt)
    ``{"ref", "checked_out"}``: the tenant left in the context, and connections checked out.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
# and the framework imports are local to each builder.

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Annotated, Any

import psycopg
from sqlalchemy import exc, select

from sqla_tenancy import Tenancy
from sqla_tenancy.checkpoint import Admission, Checkpoint
from sqla_tenancy.context import current_tenant_ref
from sqla_tenancy.resolvers import TenantResolver
from tests.models import Project, Task

PAUSE = 0.005


def _payload(admission: Admission, names: list[str]) -> dict[str, Any]:
    return {
        "tenant": admission.tenant.slug,
        "credential": admission.credential,
        "anonymous": admission.is_anonymous,
        "ref": str(current_tenant_ref()),
        "names": names,
    }


def _names(session: Any) -> list[str]:
    return list(session.scalars(select(Project.name).order_by(Project.name)))


def _tasks(admission: Admission, session: Any) -> tuple[dict[str, Any], int]:
    """The tenant's task titles, or 403 when PostgreSQL refuses the request's role."""
    try:
        titles = list(session.scalars(select(Task.title).order_by(Task.title)))
    except exc.ProgrammingError as error:
        if not isinstance(error.orig, psycopg.errors.InsufficientPrivilege):
            raise
        return {"error": "permission_denied", "detail": str(error.orig).splitlines()[0]}, 403
    return {"tenant": admission.tenant.slug, "credential": admission.credential, "titles": titles}, 200


def flask_app(
    tenancy: Tenancy, checkpoint: Checkpoint | None, *, resolvers: Sequence[TenantResolver] | None = None
) -> Any:
    from flask import Flask, Response

    from sqla_tenancy.integrations.flask import TenancyFlask

    app = Flask("flask_tenancy_test")
    ext = TenancyFlask(app, tenancy=tenancy, checkpoint=checkpoint, resolvers=resolvers)

    def projects_view() -> Any:
        first = _names(ext.session)
        time.sleep(PAUSE)
        second = _names(ext.session)
        if first != second:
            return {"error": "reads disagree", "first": first, "second": second}, 500
        assert ext.admission is not None
        return _payload(ext.admission, first)

    app.add_url_rule("/projects", "projects", projects_view)

    @app.get("/tasks")
    def tasks() -> Any:
        assert ext.admission is not None
        return _tasks(ext.admission, ext.session)

    app.add_url_rule("/t/<slug>/projects", "path_projects", lambda slug: projects_view())

    @app.get("/stream")
    def stream() -> Response:
        maker = tenancy.sessionmaker()

        def lines() -> Iterator[str]:
            for _ in range(3):
                with maker() as session:
                    yield json.dumps({"ref": str(current_tenant_ref()), "names": _names(session)}) + "\n"
                time.sleep(PAUSE)

        return Response(ext.stream(lines()), mimetype="application/x-ndjson")

    @app.get("/boom")
    def boom() -> Any:
        ext.session.execute(select(Project.id)).first()
        raise RuntimeError("the view failed")

    @app.get("/probe")
    @ext.exempt
    def probe() -> Any:
        return {"ref": repr(current_tenant_ref()), "checked_out": tenancy.engine.pool.checkedout()}

    return app


def flask_sqlalchemy_app(tenancy: Tenancy, checkpoint: Checkpoint | None, **config: Any) -> Any:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from sqla_tenancy.integrations.flask import TenancyFlask
    from sqla_tenancy.integrations.flask_sqlalchemy import FlaskSQLAlchemyTenantSession

    db = SQLAlchemy(session_options={"class_": FlaskSQLAlchemyTenantSession})
    app = Flask("flask_sqlalchemy_tenancy_test")
    app.config["SQLALCHEMY_DATABASE_URI"] = tenancy.url.set(drivername="postgresql+psycopg")
    app.config.update(config)
    db.init_app(app)
    ext = TenancyFlask(app, tenancy=tenancy, checkpoint=checkpoint)

    @app.get("/projects")
    def projects() -> Any:
        first = _names(db.session)
        time.sleep(PAUSE)
        second = list(db.session.execute(select(Project.name).order_by(Project.name)).scalars())
        if first != second:
            return {"error": "reads disagree", "first": first, "second": second}, 500
        assert ext.admission is not None
        return _payload(ext.admission, first)

    @app.post("/projects")
    def add_project() -> Any:
        from flask import request

        project = Project(name=request.get_json()["name"])
        db.session.add(project)
        db.session.commit()
        return {"id": project.id, "tenant_id": str(project.tenant_id)}, 201

    @app.get("/session-class")
    def session_class() -> Any:
        return {"class": type(db.session()).__name__}

    app.extensions["test_db"] = db
    return app


def fastapi_app(
    tenancy: Tenancy, checkpoint: Checkpoint | None, *, resolvers: Sequence[TenantResolver] | None = None
) -> Any:
    from fastapi import BackgroundTasks, Depends, FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from sqlalchemy.ext.asyncio import AsyncSession

    from sqla_tenancy import TenantSession
    from sqla_tenancy.integrations.asgi import (
        TenancyMiddleware,
        get_admission,
        get_async_session,
        get_session,
        get_tenant,
    )
    from sqla_tenancy.registry import Tenant

    SessionDep = Annotated[TenantSession, Depends(get_session)]
    AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_session)]
    AdmissionDep = Annotated[Admission, Depends(get_admission)]
    TenantDep = Annotated[Tenant, Depends(get_tenant)]

    # A real application's lifespan would `await tenancy.dispose_async()` at shutdown; here several
    # servers share one Tenancy, which the `world` fixture disposes.
    app = FastAPI()
    app.add_middleware(
        TenancyMiddleware,
        tenancy=tenancy,
        checkpoint=checkpoint,
        resolvers=resolvers,
        exempt_paths=["/probe"],
    )
    maker = tenancy.sessionmaker()

    def projects_view(session: TenantSession, admission: Admission) -> Any:
        first = _names(session)
        time.sleep(PAUSE)
        second = _names(session)
        if first != second:
            return JSONResponse({"error": "reads disagree", "first": first, "second": second}, 500)
        return _payload(admission, first)

    @app.get("/projects")
    def projects(session: SessionDep, admission: AdmissionDep) -> Any:
        return projects_view(session, admission)

    @app.get("/tasks")
    def tasks(session: SessionDep, admission: AdmissionDep) -> Any:
        body, status = _tasks(admission, session)
        return JSONResponse(body, status)

    @app.get("/t/{slug}/projects")
    def path_projects(
        slug: str,
        session: SessionDep,
        admission: AdmissionDep,
    ) -> Any:
        return projects_view(session, admission)

    @app.get("/projects-async")
    async def projects_async(session: AsyncSessionDep, admission: AdmissionDep) -> Any:
        first = list(await session.scalars(select(Project.name).order_by(Project.name)))
        await asyncio.sleep(PAUSE)
        second = list(await session.scalars(select(Project.name).order_by(Project.name)))
        if first != second:
            return JSONResponse({"error": "reads disagree", "first": first, "second": second}, 500)
        return _payload(admission, first)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async_maker = tenancy.async_sessionmaker()

        async def lines() -> AsyncIterator[str]:
            for _ in range(3):
                async with async_maker() as session:
                    names = list(await session.scalars(select(Project.name).order_by(Project.name)))
                yield json.dumps({"ref": str(current_tenant_ref()), "names": names}) + "\n"
                await asyncio.sleep(PAUSE)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def write_row(name: str) -> None:
        time.sleep(0.05)  # well after the response went out
        with maker() as session:
            session.add(Project(name=name))
            session.commit()

    async def write_row_async(name: str) -> None:
        await asyncio.sleep(0.05)
        async with tenancy.async_sessionmaker()() as session:
            session.add(Project(name=name))
            await session.commit()

    @app.post("/background")
    def background(marker: str, tasks: BackgroundTasks, tenant: TenantDep) -> Any:
        tasks.add_task(write_row, f"{tenant.slug}-bg-{marker}")
        return {"scheduled": marker}

    @app.post("/background-async")
    async def background_async(marker: str, tasks: BackgroundTasks, tenant: TenantDep) -> Any:
        tasks.add_task(write_row_async, f"{tenant.slug}-bg-{marker}")
        return {"scheduled": marker}

    @app.get("/boom")
    def boom(session: SessionDep) -> Any:
        session.execute(select(Project.id)).first()
        raise RuntimeError("the view failed")

    @app.get("/probe")
    def probe() -> Any:
        return {"ref": repr(current_tenant_ref()), "checked_out": tenancy.engine.pool.checkedout()}

    return app


# -- requests that skip the checkpoint ----------------------------------------------------------------
#
# ``GET|OPTIONS /preflight/projects``
#     a view that serves OPTIONS itself (a CORS preflight skips the checkpoint; a GET does not).
# ``GET /exempt/projects`` (and ``/exempt/projects-async``, FastAPI)
#     an exempt view that queries with whatever context it was given.
# ``GET /exempt/platform``
#     an exempt view that enters ``platform_context`` itself (a health check across tenants).
# ``GET /exempt/tenant/<slug>``
#     an exempt view that enters ``tenant_context(slug)`` itself (a login view choosing its tenant).
#
# Each answers ``{"ref", "names"}``, or 500 ``{"ref", "error": "TenantRequired", "detail"}`` when
# the library refused the query. The Flask apps also take ``X-Read-In: before`` (an application
# ``before_request`` hook reads and answers instead of the view, on any URL, known or not) and
# ``X-Read-In: after`` (an ``after_request`` hook reads and answers, refused requests included).

HEALTH_REASON = "health check: count every tenant's projects"


def _read(read: Any) -> tuple[dict[str, Any], int]:
    from sqla_tenancy import TenantRequired

    ref = repr(current_tenant_ref())
    try:
        names = read()
    except TenantRequired as error:
        return {"ref": ref, "error": "TenantRequired", "detail": str(error)}, 500
    return {"ref": ref, "names": names}, 200


def _flask_unchecked_routes(app: Any, exempt: Any, session: Any) -> None:
    """The routes above, and the ``X-Read-In`` hooks, on a Flask app; ``session()`` is the request's."""
    from flask import request

    from sqla_tenancy import platform_context, tenant_context

    @app.before_request
    def read_before() -> Any:
        if request.headers.get("X-Read-In") == "before":
            return _read(lambda: _names(session()))
        return None

    @app.after_request
    def read_after(response: Any) -> Any:
        if request.headers.get("X-Read-In") == "after":
            return app.make_response(_read(lambda: _names(session())))
        return response

    @app.route("/preflight/projects", methods=["GET", "OPTIONS"])
    def preflight_projects() -> Any:
        return _read(lambda: _names(session()))

    @app.get("/exempt/projects")
    @exempt
    def exempt_projects() -> Any:
        return _read(lambda: _names(session()))

    @app.get("/exempt/platform")
    @exempt
    def exempt_platform() -> Any:
        def read() -> list[str]:
            with platform_context(HEALTH_REASON):
                return _names(session())

        return _read(read)

    @app.get("/exempt/tenant/<slug>")
    @exempt
    def exempt_tenant(slug: str) -> Any:
        def read() -> list[str]:
            with tenant_context(slug):
                return _names(session())

        return _read(read)


def flask_unchecked_app(tenancy: Tenancy, checkpoint: Checkpoint | None) -> Any:
    """The routes that skip the checkpoint, on Flask with :attr:`TenancyFlask.session`."""
    from flask import Flask

    from sqla_tenancy.integrations.flask import TenancyFlask

    app = Flask("flask_unchecked_test")
    ext = TenancyFlask(app, tenancy=tenancy, checkpoint=checkpoint)
    _flask_unchecked_routes(app, ext.exempt, lambda: ext.session)
    return app


def flask_sqlalchemy_unchecked_app(tenancy: Tenancy, checkpoint: Checkpoint | None) -> Any:
    """The routes that skip the checkpoint, on Flask-SQLAlchemy's ``db.session``."""
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from sqla_tenancy.integrations.flask import TenancyFlask
    from sqla_tenancy.integrations.flask_sqlalchemy import FlaskSQLAlchemyTenantSession

    db = SQLAlchemy(session_options={"class_": FlaskSQLAlchemyTenantSession})
    app = Flask("flask_sqlalchemy_unchecked_test")
    app.config["SQLALCHEMY_DATABASE_URI"] = tenancy.url.set(drivername="postgresql+psycopg")
    db.init_app(app)
    ext = TenancyFlask(app, tenancy=tenancy, checkpoint=checkpoint)
    _flask_unchecked_routes(app, ext.exempt, lambda: db.session)
    return app


def fastapi_unchecked_app(tenancy: Tenancy, checkpoint: Checkpoint | None) -> Any:
    """The routes that skip the checkpoint, on FastAPI (``/exempt`` is an exempt path)."""
    from fastapi import Depends, FastAPI
    from fastapi.responses import JSONResponse
    from sqlalchemy.ext.asyncio import AsyncSession

    from sqla_tenancy import TenantSession, platform_context, tenant_context
    from sqla_tenancy.integrations.asgi import TenancyMiddleware, get_async_session, get_session

    SessionDep = Annotated[TenantSession, Depends(get_session)]
    AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_session)]

    app = FastAPI()
    app.add_middleware(TenancyMiddleware, tenancy=tenancy, checkpoint=checkpoint, exempt_paths=["/exempt"])

    def answer(read: Any) -> JSONResponse:
        body, status = _read(read)
        return JSONResponse(body, status)

    @app.api_route("/preflight/projects", methods=["GET", "OPTIONS"])
    def preflight_projects(session: SessionDep) -> Any:
        return answer(lambda: _names(session))

    @app.get("/exempt/projects")
    def exempt_projects(session: SessionDep) -> Any:
        return answer(lambda: _names(session))

    @app.get("/exempt/projects-async")
    async def exempt_projects_async(session: AsyncSessionDep) -> Any:
        from sqla_tenancy import TenantRequired

        ref = repr(current_tenant_ref())
        try:
            names = list(await session.scalars(select(Project.name).order_by(Project.name)))
        except TenantRequired as error:
            return JSONResponse({"ref": ref, "error": "TenantRequired", "detail": str(error)}, 500)
        return {"ref": ref, "names": names}

    @app.get("/exempt/platform")
    def exempt_platform(session: SessionDep) -> Any:
        def read() -> list[str]:
            with platform_context(HEALTH_REASON):
                return _names(session)

        return answer(read)

    @app.get("/exempt/tenant/{slug}")
    def exempt_tenant(slug: str, session: SessionDep) -> Any:
        def read() -> list[str]:
            with tenant_context(slug):
                return _names(session)

        return answer(read)

    return app
