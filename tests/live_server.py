"""Real HTTP servers on loopback for the web tests: werkzeug for WSGI apps, uvicorn for ASGI apps,
each on a free port in a daemon thread, stopped by the returned handle."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class LiveServer:
    base_url: str
    stop: Callable[[], None]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10.0, **kwargs)


def serve_wsgi(app: Any, *, threaded: bool = True) -> LiveServer:
    """A werkzeug server for a WSGI app on a free loopback port, in a thread."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=threaded)
    thread = threading.Thread(target=server.serve_forever, name="wsgi-test-server", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    return LiveServer(f"http://127.0.0.1:{server.server_port}", stop)


def serve_asgi(app: Any) -> LiveServer:
    """A uvicorn server for an ASGI app on a free loopback port, in a thread (lifespan on, so the
    app's shutdown runs on stop)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", loop="asyncio"))
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="asgi-test-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return LiveServer(f"http://127.0.0.1:{port}", stop)
