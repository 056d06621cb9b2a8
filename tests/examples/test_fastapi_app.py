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
