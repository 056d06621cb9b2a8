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
)

#: exit codes besides 0 (success) and 1 (the operation failed)
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_REFUSED = 4

AppOption = Annotated[
    Optional[str],  # noqa: UP045 - typer reads the annotation at runtime
    typer.Option(
        "--app",
        envvar="SQLA_TENANCY_APP",
        help="The application's Tenancy as module:attribute (or a function returning it); "
        "default: $SQLA_TENANCY_APP, then the [sqla_tenancy] app of alembic.ini.",
    ),
]
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The project's alembic.ini.")]
