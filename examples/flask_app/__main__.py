"""``python -m examples.flask_app [--port 5000]``: the Flask example on a private PostgreSQL, with
demo tenants and data; prints ready-to-paste curl commands. Ctrl-C stops it and cleans up."""

from __future__ import annotations

import socket
import sys

from werkzeug.serving import make_server

from ..launch import HOST, DemoEnvironment, main
from .app import create_app, dispose_app


def serve(env: DemoEnvironment, sock: socket.socket) -> None:
    """Serve until interrupted, on werkzeug's threaded server (a development server: in
    production, run ``create_app`` under gunicorn or similar)."""
    app = create_app(env.settings)
    server = make_server(HOST, sock.getsockname()[1], app, threaded=True, fd=sock.fileno())
    try:
        server.serve_forever()
    finally:
        server.server_close()
        dispose_app(app)


if __name__ == "__main__":
    sys.exit(main("Flask", serve, default_port=5000))
