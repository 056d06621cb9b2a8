"""The Flask extension, over HTTP against a werkzeug server (see :mod:`.suite`)."""

from __future__ import annotations

from typing import ClassVar

import pytest

from tests.live_server import serve_wsgi

from .apps import flask_app, flask_unchecked_app
from .conftest import World
from .suite import CheckpointSuite, strict_checkpoint
from .unchecked import FlaskHooksSuite

pytest.importorskip("flask")


class TestFlask(CheckpointSuite):
    build = staticmethod(flask_app)
    serve = staticmethod(serve_wsgi)
    serve_serially = staticmethod(lambda app: serve_wsgi(app, threaded=False))
    project_paths: ClassVar[tuple[str, ...]] = ("/projects",)


class TestFlaskUncheckedRequests(FlaskHooksSuite):
    build = staticmethod(flask_unchecked_app)
    serve = staticmethod(serve_wsgi)


def test_extension_refuses_to_serve_the_tenant_of_an_exempt_route(world: World) -> None:
    from sqla_tenancy.integrations import IntegrationError

    app = flask_app(world.tenancy, strict_checkpoint())
    ext = app.extensions["sqla_tenancy"]
    with app.test_request_context("/probe"):
        app.preprocess_request()
        assert ext.admission is None
        with pytest.raises(IntegrationError, match="exempt"):
            _ = ext.tenant
