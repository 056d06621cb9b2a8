"""The first thing a new user runs must work and must show isolation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sqla_tenancy.testing import TestServer


def test_demo_runs_on_its_own_postgres() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "sqla_tenancy.demo"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[acme] ORM sees ['giant magnet', 'rocket skates']" in proc.stdout
    assert "[globex] ORM sees ['doomsday device']" in proc.stdout
    assert "refused by PostgreSQL: new row violates row-level security policy" in proc.stdout


def _bad_urls(server: TestServer, database: str) -> dict[str, tuple[str, str]]:
    """name -> (DATABASE_URL, what the one line must say)."""
    app = server.url(database).render_as_string(hide_password=False)
    wrong = server.superuser_url.set(password="not-the-password").render_as_string(hide_password=False)
    return {
        "not a URL": ("not a url", "DATABASE_URL is not a database URL"),
        "another database": ("mysql://someone@localhost/db", "must be a postgresql:// URL"),
        "not a superuser": (app, f"must be a superuser's URL ({server.app_role!r} is not a superuser)"),
        "wrong password": (wrong, "password authentication failed"),
        "nobody listening": (
            "postgresql://u:secret-pw@127.0.0.1:1/x",
            "DATABASE_URL: cannot connect as u@127.0.0.1:1/x",
        ),
    }


@pytest.mark.parametrize(
    "command",
    [["sqla_tenancy.demo"], ["examples.flask_app", "--port", "0"], ["examples.fastapi_app", "--port", "0"]],
    ids=["demo", "flask-example", "fastapi-example"],
)
def test_a_bad_database_url_is_one_line_naming_the_variable(
    command: list[str], tenancy_server: TestServer, tenancy_database: str
) -> None:
    for name, (url, says) in _bad_urls(tenancy_server, tenancy_database).items():
        proc = subprocess.run(
            [sys.executable, "-m", *command],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DATABASE_URL": url},
        )
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: DATABASE_URL"), (name, proc.stderr)
        assert says in errors[0], (name, errors[0])
        assert "Traceback" not in proc.stdout + proc.stderr
        for secret in (tenancy_server.app_password, "not-the-password", "secret-pw"):
            assert secret not in proc.stdout + proc.stderr, name
