"""The ASGI middleware and FastAPI dependencies, over HTTP against uvicorn (see :mod:`.suite`)."""

from __future__ import annotations

import time
import uuid
from typing import ClassVar

import httpx
import pytest

from tests.live_server import serve_asgi

from .apps import fastapi_app, fastapi_unchecked_app
from .conftest import World, bearer, make_token
from .suite import CheckpointSuite
from .unchecked import UncheckedRequestSuite

pytest.importorskip("fastapi")


def wait_for_row(world: World, slug: str, name: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while name not in world.names(slug):
        assert time.monotonic() < deadline, f"{name} never landed in {slug}"
        time.sleep(0.02)


class TestFastAPI(CheckpointSuite):
    build = staticmethod(fastapi_app)
    serve = staticmethod(serve_asgi)
    serve_serially = staticmethod(serve_asgi)
    project_paths: ClassVar[tuple[str, ...]] = ("/projects", "/projects-async")

    @pytest.mark.parametrize("route", ["/background", "/background-async"])
    def test_a_background_task_writes_into_the_requests_tenant(
        self, strict: httpx.Client, world: World, route: str
    ) -> None:
        marker = uuid.uuid4().hex[:8]
        response = strict.post(route, params={"marker": marker}, headers=bearer(make_token("globex")))
        assert response.status_code == 200, response.text
        name = f"globex-bg-{marker}"
        wait_for_row(world, "globex", name)
        for other in ("acme", "hooli", "default"):
            assert name not in world.names(other)


class TestFastAPIUncheckedRequests(UncheckedRequestSuite):
    build = staticmethod(fastapi_unchecked_app)
    serve = staticmethod(serve_asgi)
    exempt_query_paths: ClassVar[tuple[str, ...]] = ("/exempt/projects", "/exempt/projects-async")


def websocket_app(world: World):
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    from sqla_tenancy.context import current_tenant_ref
    from sqla_tenancy.integrations.asgi import TenancyMiddleware, get_tenant

    from .suite import strict_checkpoint

    async def echo_tenant(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"tenant": get_tenant(websocket).slug, "ref": str(current_tenant_ref())})
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", echo_tenant)])
    return TenancyMiddleware(app, tenancy=world.tenancy, checkpoint=strict_checkpoint())


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_websockets_are_checked_too(world: World) -> None:
    """In-process (Starlette's TestClient): uvicorn needs a websocket library the suite does not install."""
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    with TestClient(websocket_app(world)) as client:
        with client.websocket_connect("/ws", headers=bearer(make_token("globex"))) as ws:
            assert ws.receive_json() == {"tenant": "globex", "ref": str(world.tenants["globex"].id)}
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect(
                "/ws", headers={"X-Tenant-ID": "acme", **bearer(make_token("globex"))}
            ):
                pass
        assert refused.value.code == 1008


def test_dependencies_need_the_middleware() -> None:
    from starlette.requests import HTTPConnection

    from sqla_tenancy.integrations import IntegrationError
    from sqla_tenancy.integrations.asgi import get_tenant

    with pytest.raises(IntegrationError, match="TenancyMiddleware is not installed"):
        get_tenant(HTTPConnection({"type": "http", "path": "/", "headers": []}))
