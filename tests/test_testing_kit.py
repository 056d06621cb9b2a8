"""The pytest plugin's tenant fixtures, on the suite's own model: the application's Tenancy is
rebound to the test server, every test gets an empty tenant, and writes never outlive a test."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from flask import Flask, g, request
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sqla_tenancy import Tenancy, Tenant, TenantSession, tenant_context
from sqla_tenancy.checkpoint import Checkpoint, JWTVerifier
from sqla_tenancy.integrations.asgi import TenancyMiddleware, get_async_session, get_session
from sqla_tenancy.integrations.flask import TenancyFlask
from sqla_tenancy.testing.isolation import IsolationReport
from sqla_tenancy.testing.plugin import hmac_token_minter

from .conftest import APP
from .models import Project, Task, User


def projects(session: Session) -> list[str]:
    return list(session.scalars(select(Project.name).order_by(Project.name)))


def test_the_applications_own_object_is_rebound_to_the_test_server(app_tenancy: Tenancy) -> None:
    assert app_tenancy is APP
    assert app_tenancy.url.host != "db.invalid" and app_tenancy.admin_url.host != "db.invalid"
    assert app_tenancy.config.registry_ttl == 2.0  # the application's other settings are kept
    with app_tenancy.admin_engine.connect() as conn:
        assert conn.execute(text("select to_regclass('tasks')")).scalar() == "tasks"


@pytest.mark.tenant(placement="all")
def test_the_tenant_is_fresh_and_active_in_every_placement(
    tenant: Tenant, tenant_placement: str, tenant_session: TenantSession
) -> None:
    assert tenant.strategy == tenant_placement
    assert projects(tenant_session) == []
    tenant_session.add(Project(name="apollo"))
    tenant_session.commit()  # the application's commit works (it releases a SAVEPOINT)
    assert projects(tenant_session) == ["apollo"]


@pytest.mark.tenant(placement=["shared", "schema"])
@pytest.mark.parametrize("step", ["write", "then read"])
def test_writes_are_rolled_back_after_each_test(app_tenancy: Tenancy, tenant: Tenant, step: str) -> None:
    Session = app_tenancy.sessionmaker()
    with Session() as session:
        assert projects(session) == []  # nothing left by the previous step
        project = Project(name=f"left by {step}")
        session.add(project)
        session.flush()
        session.add(Task(project_id=project.id, title="t"))
        session.commit()
    with Session() as session:
        assert projects(session) == [f"left by {step}"]


@pytest.mark.parametrize("step", ["commit through Core", "then read"])
def test_core_commits_outside_the_test_transaction_are_cleaned_up(
    app_tenancy: Tenancy, tenant: Tenant, tenant_session: TenantSession, step: str
) -> None:
    assert projects(tenant_session) == []
    with app_tenancy.connect() as conn, conn.begin():  # a connection of its own: really commits
        conn.execute(text("insert into projects (name) values (:n)"), {"n": step})


def test_a_failed_flush_rolls_back_to_the_savepoint_only(
    tenant: Tenant, tenant_session: TenantSession
) -> None:
    tenant_session.add(Project(name="kept"))
    tenant_session.commit()
    tenant_session.add(Task(project_id=-1, title="orphan"))  # the foreign key refuses it
    with pytest.raises(Exception, match="foreign key"):
        tenant_session.commit()
    tenant_session.rollback()
    assert projects(tenant_session) == ["kept"]


def test_make_tenant_as_tenant_and_platform_session(
    app_tenancy: Tenancy,
    tenant: Tenant,
    make_tenant,
    as_tenant,
    platform_session: Session,
) -> None:
    other = make_tenant("globex", placement="schema")
    Session = app_tenancy.sessionmaker()
    with as_tenant("globex"), Session() as session:
        session.add(Project(name="globex project"))
        session.commit()
    with Session() as session:  # back in the test's tenant
        assert projects(session) == []
    with as_tenant(other), Session() as session:
        assert projects(session) == ["globex project"]
    assert other.slug in {t.slug for t in app_tenancy.list_tenants()}
    assert platform_session.scalar(select(func.count()).select_from(Project)) >= 0


def test_the_isolation_checker_as_a_fixture(tenant_isolation) -> None:
    report: IsolationReport = tenant_isolation(placements=["shared", "schema"])
    assert report.ok and report.checks > 50


@pytest.mark.tenant(placement="schema")
async def test_async_sessions_serve_the_tenant(app_tenancy: Tenancy, tenant: Tenant) -> None:
    Session = app_tenancy.async_sessionmaker()
    async with Session() as session:
        session.add(Project(name="async"))
        await session.commit()
        names = (await session.scalars(select(Project.name))).all()
    assert names == ["async"]


@pytest.mark.tenant(placement="schema")
async def test_async_writes_do_not_outlive_their_test(app_tenancy: Tenancy, tenant: Tenant) -> None:
    Session = app_tenancy.async_sessionmaker()
    async with Session() as session:
        assert (await session.scalars(select(Project.name))).all() == []


def test_outside_the_tenant_fixture_no_context_is_left(app_tenancy: Tenancy) -> None:
    from sqla_tenancy.context import current_tenant_ref

    assert current_tenant_ref() is None
    with tenant_context("default"), app_tenancy.sessionmaker()() as session:
        assert projects(session) == []


# -- tenant-bound HTTP clients ----------------------------------------------------------------------

JWT_SECRET = "testing-kit-hs256-secret-0123456789abcdef"


@pytest.fixture
def tenant_token():
    return hmac_token_minter(JWT_SECRET)


def checkpoint() -> Checkpoint:
    return Checkpoint(verifier=JWTVerifier(JWT_SECRET, algorithms=["HS256"]))


@pytest.fixture
def flask_app(app_tenancy: Tenancy) -> Flask:
    app = Flask(__name__)
    ext = TenancyFlask(app, tenancy=app_tenancy, checkpoint=checkpoint())

    @app.get("/projects")
    def list_projects() -> dict[str, Any]:
        return {"projects": projects(ext.session), "sub": g.get("sub")}

    @app.post("/projects")
    def add_project() -> tuple[dict[str, Any], int]:
        ext.session.add(Project(name=request.get_json()["name"]))
        ext.session.commit()
        return {"ok": True}, 201

    return app


@pytest.mark.tenant(placement="all")
def test_the_flask_client_acts_for_the_tenant(
    flask_app: Flask, tenant: Tenant, make_tenant, flask_client, tenant_session: TenantSession
) -> None:
    client = flask_client(flask_app, tenant, as_user="ada@example.com")
    assert client.post("/projects", json={"name": "apollo"}).status_code == 201
    assert client.get("/projects").get_json()["projects"] == ["apollo"]
    assert projects(tenant_session) == ["apollo"]  # the same (rolled-back) transaction
    other = flask_client(flask_app, make_tenant(placement=tenant.strategy), as_user="bob@example.com")
    assert other.get("/projects").get_json()["projects"] == []
    # without a token the checkpoint refuses the request
    assert flask_client(flask_app, tenant).get("/projects").status_code == 401


def test_a_client_asked_for_a_user_needs_a_token_minter(flask_app: Flask, tenant: Tenant) -> None:
    from sqla_tenancy.testing.plugin import _headers

    with pytest.raises(pytest.UsageError, match="tenant_token"):
        _headers(tenant, "ada", None, "X-Tenant-ID")


SessionDep = Annotated[TenantSession, Depends(get_session)]
AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_session)]


@pytest.fixture
def asgi_app(app_tenancy: Tenancy) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, tenancy=app_tenancy, checkpoint=checkpoint())

    @app.get("/projects")
    async def list_projects(session: AsyncSessionDep) -> dict[str, Any]:
        return {"projects": list((await session.scalars(select(Project.name))).all())}

    @app.post("/projects", status_code=201)
    def add_project(body: dict[str, str], session: SessionDep) -> dict[str, Any]:
        session.add(Project(name=body["name"]))
        session.commit()
        return {"ok": True}

    return app


@pytest.mark.tenant(placement="all")
async def test_the_asgi_client_acts_for_the_tenant(asgi_app: FastAPI, tenant: Tenant, asgi_client) -> None:
    async with asgi_client(asgi_app, tenant, as_user="ada@example.com") as client:
        assert (await client.post("/projects", json={"name": "gemini"})).status_code == 201
        assert (await client.get("/projects")).json() == {"projects": ["gemini"]}


@pytest.mark.tenant(placement="database")
@pytest.mark.parametrize("step", ["write", "then read"])
def test_a_pooled_database_tenant_is_emptied_after_each_test(
    tenant: Tenant, tenant_session: TenantSession, step: str
) -> None:
    assert projects(tenant_session) == []
    assert tenant_session.scalars(select(User)).all() == []  # infrastructure rows (through the FDW)
    project = Project(name=step)
    tenant_session.add_all([project, User(email=f"{step}@example.com")])
    tenant_session.flush()
    assert project.id == 1  # identities restart
    tenant_session.commit()


@pytest.mark.tenant(placement="all", fresh=True)
def test_a_fresh_tenant_is_provisioned_for_the_test(
    app_tenancy: Tenancy, tenant: Tenant, tenant_placement: str, _tenant_kit
) -> None:
    assert tenant.strategy == tenant_placement
    assert tenant.id not in {t.id for t in _tenant_kit.pool.values()}
