"""The Typer application every command module registers on, and the options they share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="sqla-tenancy",
    help="Multi-tenancy for SQLAlchemy on PostgreSQL: tenants, migrations and fleet operations.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # locals would print URLs with their passwords
)

#: exit codes (docs/cli.md): 0 success
EXIT_FAILED = 1  #: the operation failed (a tenant, a check, a script)
EXIT_USAGE = 2  #: bad usage or configuration (unknown option, application not found)
EXIT_LOCKED = 3  #: another migration run holds the fleet lock
EXIT_REFUSED = 4  #: a destructive command was not confirmed

AppOption = Annotated[
    Optional[str],  # noqa: UP045 - typer reads the annotation at runtime
    typer.Option(
        "--app",
        envvar="SQLA_TENANCY_APP",
        help="The application's Tenancy as module:attribute (or a function returning it); "
        "default: $SQLA_TENANCY_APP, then the app option of alembic.ini's sqla_tenancy section.",
    ),
]
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The project's alembic.ini.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
