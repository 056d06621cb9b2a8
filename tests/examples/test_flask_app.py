"""``examples.flask_app`` over HTTP against werkzeug's threaded server (see :mod:`.suite`)."""

from __future__ import annotations

import pytest

pytest.importorskip("flask")

from examples.flask_app import create_app, dispose_app
from tests.live_server import serve_wsgi

from .conftest import DemoWorld
from .suite import ExampleAppSuite, assert_shutdown_releases_everything


class TestFlaskApp(ExampleAppSuite):
    create_app = staticmethod(create_app)
    serve = staticmethod(serve_wsgi)
    dispose = staticmethod(dispose_app)


def test_dispose_app_releases_every_connection(world: DemoWorld, caplog: pytest.LogCaptureFixture) -> None:
    assert_shutdown_releases_everything(world, caplog, create_app, serve_wsgi, dispose_app)
