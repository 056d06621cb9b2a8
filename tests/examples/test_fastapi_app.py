"""``examples.fastapi_app`` over HTTP against uvicorn (see :mod:`.suite`); the app's lifespan
disposes its Tenancy when the server stops."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from examples.fastapi_app import create_app
from tests.live_server import serve_asgi

from .conftest import DemoWorld
from .suite import ExampleAppSuite, assert_shutdown_releases_everything


class TestFastAPIApp(ExampleAppSuite):
    create_app = staticmethod(create_app)
    serve = staticmethod(serve_asgi)


def test_the_lifespan_releases_every_connection(world: DemoWorld, caplog: pytest.LogCaptureFixture) -> None:
    assert_shutdown_releases_everything(world, caplog, create_app, serve_asgi)


def test_openapi_declares_the_bearer_token_and_the_tenant_header(world: DemoWorld) -> None:
    """So that "Authorize" on /docs sends them: "Try it out" then works on the example app."""
    app = create_app(world.settings)
    schema = app.openapi()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["BearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["BearerToken"]["description"],
    }
    assert (
        schemes["TenantHeader"]["type"],
        schemes["TenantHeader"]["in"],
        schemes["TenantHeader"]["name"],
    ) == (
        "apiKey",
        "header",
        "X-Tenant-ID",
    )
    assert schemes["TenantAccessKey"]["name"] == "X-Tenant-Access-Key"
    listed = {name for option in schema["paths"]["/projects"]["get"]["security"] for name in option}
    assert listed == {"BearerToken", "TenantHeader", "TenantAccessKey"}
    assert "security" not in schema["paths"]["/health"]["get"]
