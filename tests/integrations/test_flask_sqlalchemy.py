"""Flask-SQLAlchemy's ``db.session`` routed by the request's tenant, over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import MetaData, Table, select

from sqla_tenancy import tenant_context
from tests.live_server import serve_wsgi

from .apps import flask_sqlalchemy_app, flask_sqlalchemy_unchecked_app
from .conftest import World, bearer, make_token
from .suite import assert_only, strict_checkpoint
from .unchecked import FlaskHooksSuite

pytest.importorskip("flask_sqlalchemy")


class TestFlaskSQLAlchemyUncheckedRequests(FlaskHooksSuite):
    """Preflights, exempt views and application hooks query through ``db.session``."""

    build = staticmethod(flask_sqlalchemy_unchecked_app)
    serve = staticmethod(serve_wsgi)


@pytest.fixture(scope="module")
def client(world: World) -> Iterator[httpx.Client]:
    server = serve_wsgi(flask_sqlalchemy_app(world.tenancy, strict_checkpoint()))
    with server.client() as client:
        yield client
    server.stop()


def test_db_session_is_the_tenant_session(client: httpx.Client) -> None:
    response = client.get("/session-class", headers=bearer(make_token("acme")))
    assert response.json() == {"class": "FlaskSQLAlchemyTenantSession"}


def test_db_session_sees_only_the_requests_tenant(client: httpx.Client) -> None:
    for slug in ("acme", "globex", "hooli"):
        response = client.get("/projects", headers={"X-Tenant-ID": slug, **bearer(make_token(slug))})
        assert response.status_code == 200, response.text
        assert_only(slug, response.json())


def test_db_session_writes_into_the_requests_tenant(client: httpx.Client, world: World) -> None:
    response = client.post("/projects", json={"name": "hooli-fsa"}, headers=bearer(make_token("hooli")))
    assert response.status_code == 201, response.text
    assert response.json()["tenant_id"] == str(world.tenants["hooli"].id)
    assert "hooli-fsa" in world.names("hooli")
    assert all("hooli-fsa" not in world.names(slug) for slug in ("acme", "globex", "default"))


def test_db_session_refuses_a_mismatched_token(client: httpx.Client) -> None:
    response = client.get("/projects", headers={"X-Tenant-ID": "acme", **bearer(make_token("globex"))})
    assert response.status_code == 403


def test_concurrent_requests_through_db_session_never_mix(client: httpx.Client) -> None:
    jobs = ["acme", "globex", "hooli"] * 12

    def call(slug: str) -> tuple[str, httpx.Response]:
        return slug, client.get("/projects", headers={"X-Tenant-ID": slug, **bearer(make_token(slug))})

    with ThreadPoolExecutor(max_workers=12) as pool:
        for slug, response in pool.map(call, jobs):
            assert response.status_code == 200, response.text
            assert_only(slug, response.json())


def test_tables_of_another_bind_key_keep_their_engine(world: World) -> None:
    from flask_sqlalchemy.session import Session as FlaskSQLAlchemySession

    audit_url = world.tenancy.admin_url.set(drivername="postgresql+psycopg")
    app = flask_sqlalchemy_app(world.tenancy, strict_checkpoint(), SQLALCHEMY_BINDS={"audit": audit_url})
    db = app.extensions["sqlalchemy"]
    audit = Table("audit_log", MetaData(info={"bind_key": "audit"}))
    with app.app_context():
        session = db.session()
        assert isinstance(session, FlaskSQLAlchemySession)
        assert session.get_bind(clause=audit) is db.engines["audit"]
        with tenant_context("acme"):
            from tests.models import Project

            assert session.get_bind(Project) is world.tenancy.engine
            assert session.scalars(select(Project.name)).all()
            assert all(name.startswith("acme-") for name in session.scalars(select(Project.name)))
