"""The example API with Flask: ``create_app(settings)`` builds it; :mod:`.__main__` serves it.

Every route but ``/health`` (and ``/dev/token`` when enabled) goes through the checkpoint before the
view runs: the request names its tenant (``X-Tenant-ID``, else the token's ``tenant`` claim) and
proves it may act for it (a bearer token for that tenant, or the tenant's access key for read-only
anonymous access). Views then query through ``ext.session``, which the active tenant routes: to
``acme``'s own database, or to the main database where PostgreSQL's row-level security keeps
``globex`` and the default tenant apart.
"""

from __future__ import annotations

from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from sqla_tenancy.checkpoint import Admission
from sqla_tenancy.integrations.flask import EXTENSION_KEY, TenancyFlask

from .. import common
from ..common import ApiError, Project, Settings, Task

__all__ = ["create_app", "dispose_app"]

SETTINGS_KEY = "examples.settings"

api = Blueprint("api", __name__)


def _ext() -> TenancyFlask:
    return cast(TenancyFlask, current_app.extensions[EXTENSION_KEY])


def _admission() -> Admission:
    admission = _ext().admission
    assert admission is not None  # every route of this blueprint goes through the checkpoint
    return admission


def _project(project_id: int) -> Project:
    project = _ext().session.get(Project, project_id)
    if project is None:
        raise common.project_not_found(project_id)
    return project


@api.get("/health")
@TenancyFlask.exempt
def health() -> dict[str, str]:
    return {"status": "ok"}


@api.get("/me")
def me() -> dict[str, Any]:
    admission = _admission()
    email = common.subject(admission)
    user = _ext().session.scalar(common.user_query(email)) if email is not None else None
    return common.me_json(admission, user)


@api.get("/projects")
def list_projects() -> dict[str, Any]:
    ext = _ext()
    return common.projects_json(ext.tenant, ext.session.scalars(common.projects_query()))


@api.post("/projects")
def create_project() -> tuple[dict[str, Any], int]:
    ext = _ext()
    common.require_writer(_admission())
    project = Project(name=common.text_field(request.get_json(silent=True), "name"))
    ext.session.add(project)
    ext.session.flush()
    body = {"tenant": ext.tenant.slug, "project": common.project_json(project)}
    ext.session.commit()
    return body, 201


@api.get("/projects/<int:project_id>/tasks")
def list_tasks(project_id: int) -> dict[str, Any]:
    ext = _ext()
    project = _project(project_id)
    return common.tasks_json(ext.tenant, project, ext.session.scalars(common.tasks_query(project_id)))


@api.post("/projects/<int:project_id>/tasks")
def create_task(project_id: int) -> tuple[dict[str, Any], int]:
    ext = _ext()
    admission = _admission()
    common.require_writer(admission)
    title = common.text_field(request.get_json(silent=True), "title")
    project = _project(project_id)
    task = Task(project_id=project.id, title=title, created_by=common.subject(admission))
    ext.session.add(task)
    ext.session.flush()
    body = {"tenant": ext.tenant.slug, "task": common.task_json(task)}
    ext.session.commit()
    return body, 201


dev = Blueprint("dev", __name__)


@dev.post("/dev/token")
@TenancyFlask.exempt
def dev_token() -> dict[str, Any]:
    """DEMO ONLY: a token for whoever asks. Registered only with ``Settings(dev_tokens=True)``."""
    settings = cast(Settings, current_app.extensions[SETTINGS_KEY])
    return common.dev_token(settings, request.get_json(silent=True))


def _api_error(error: ApiError) -> tuple[Response, int]:
    return jsonify(error.body()), error.status


def _http_error(error: HTTPException) -> tuple[Response, int]:
    """Flask's own answers (unknown URL, wrong method, malformed JSON) as JSON, like every other
    answer of the API."""
    status = error.code or 500
    code = (error.name or "error").lower().replace(" ", "_")
    response = jsonify({"error": code, "detail": error.description or error.name})
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response, status


def _database_error(error: DBAPIError) -> tuple[Response, int]:
    refusal = common.database_refusal(error)
    if refusal is None:
        raise error
    return _api_error(refusal)


def create_app(settings: Settings) -> Flask:
    """The Flask app over the database and secrets in ``settings``. Call :func:`dispose_app` when
    done with it (it owns a :class:`~sqla_tenancy.Tenancy` and its pools)."""
    app = Flask(__name__)
    app.extensions[SETTINGS_KEY] = settings
    TenancyFlask(
        app,
        tenancy=settings.make_tenancy(),
        checkpoint=settings.make_checkpoint(),
        resolvers=common.RESOLVERS,
    )
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(DBAPIError, _database_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_blueprint(api)
    if settings.dev_tokens:
        app.register_blueprint(dev)
    return app


def dispose_app(app: Flask) -> None:
    """Close the app's pools and registry listener."""
    cast(TenancyFlask, app.extensions[EXTENSION_KEY]).tenancy.dispose()
