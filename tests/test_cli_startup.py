"""The command line starts fast: ``--help`` and usage errors import neither the database stack
nor the application, nor what only a running command needs (Rich's tables, progress bars and
Markdown, Pydantic): benchmarks/bench_cli.py prints the times."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "sqlalchemy",
    "psycopg",
    "alembic",
    "alembic_ext",
    "sqla_tenancy.tenancy",
    "sqla_tenancy.registry",
    "rich",
    "markdown_it",
    "pydantic",
)

PROBE = """
import sys
from sqla_tenancy.cli import app
try:
    app(args={args!r}, prog_name="sqla-tenancy")
except SystemExit as exit:
    code = exit.code
print("exit", code)
heavy = {{m for m in sys.modules if m.startswith({heavy!r})}}
print("loaded", sorted({{m if m.startswith("sqla_tenancy") else m.split(".")[0] for m in heavy}}))
"""


def _loaded(args: list[str]) -> tuple[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = dict(
        line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("exit", "loaded"))
    )
    return lines["exit"], lines["loaded"]


def test_help_and_usage_errors_import_no_database_code() -> None:
    for args, code in (
        (["--help"], "0"),
        (["tenants", "--help"], "0"),
        (["tenants", "list", "--help"], "0"),
        (["tenants", "list", "--no-such-option"], "2"),
        (["no-such-command"], "2"),
    ):
        assert _loaded(args) == (code, "[]"), args
