"""``python -m examples.fastapi_app [--port 8000]``: the FastAPI example on a private PostgreSQL,
with demo tenants and data, served by uvicorn; prints ready-to-paste curl commands. Ctrl-C stops it
and cleans up (the app's lifespan disposes its engines)."""

from __future__ import annotations

import socket
import sys

import uvicorn

from ..launch import HOST, DemoEnvironment, main
from .app import create_app


def serve(env: DemoEnvironment, sock: socket.socket) -> None:
    """Serve until interrupted (uvicorn shuts down gracefully on SIGINT/SIGTERM)."""
    config = uvicorn.Config(
        create_app(env.settings), host=HOST, port=sock.getsockname()[1], lifespan="on", log_level="info"
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main("FastAPI", serve, default_port=8000))
