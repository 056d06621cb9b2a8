"""What every command needs: the application's Tenancy, output as a table or as JSON, the exit
codes, and a confirmation for destructive commands.

The Tenancy is found, in this order, from a provider set by a host command line (``flask
tenancy ...`` hands over the extension's), ``--app``, ``$SQLA_TENANCY_APP``, then the ``app``
option of the ``[sqla_tenancy]`` section of the project's ``alembic.ini`` (which ``sqla-tenancy
init`` writes). The ini's ``prepend_sys_path`` is honoured, and without an ini the current folder
is importable, so that ``myapp.db:tenancy`` imports from the project's folder as it does under
``alembic``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from ._app import EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE

if TYPE_CHECKING:
    from ..registry import Tenant
    from ..tenancy import Tenancy

#: set by a host command line (``flask tenancy``) to a ``() -> Tenancy`` that replaces ``--app``
tenancy_provider: ContextVar[Callable[[], Tenancy] | None] = ContextVar("tenancy_provider", default=None)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_tenancy(app_spec: str | None, config: Path) -> Tenancy:
    """The application's Tenancy (see the module docstring), with its ``migrations`` set to
    ``config`` when it has none and the file exists; exit 2 with one line when it cannot be found."""
    provider = tenancy_provider.get()
    if provider is not None and app_spec is None:
        tenancy: Tenancy = provider()
        return tenancy
    from alembic.config import Config

    from alembic_ext.errors import MigrationError
    from alembic_ext.fleet import load_app

    cfg = Config(str(config)) if config.is_file() else None
    if cfg is None and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        tenancy = load_app(app_spec, config=cfg)
    except MigrationError as exc:
        fail(str(exc), EXIT_USAGE)
    if tenancy.migrations is None and cfg is not None:
        tenancy.migrations = cfg
    return tenancy


@contextmanager
def operation(tenancy: Tenancy | None = None) -> Iterator[None]:
    """Turn the library's errors into one line and exit 1 (2 for configuration mistakes); dispose
    of the Tenancy's pools afterwards."""
    from sqlalchemy.exc import DBAPIError

    from ..errors import ConfigurationError, InvalidTenantSlug, TenancyError

    try:
        yield
    except DBAPIError as exc:
        if not exc.connection_invalidated and "connection" not in str(exc.orig).lower():
            raise
        first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        where = ""
        if tenancy is not None:
            url = tenancy.url
            where = f" at {url.host}:{url.port or 5432}/{url.database}"
        fail(f"cannot reach the database{where}: {first}")
    except (ConfigurationError, InvalidTenantSlug) as exc:
        fail(str(exc), EXIT_USAGE)
    except TenancyError as exc:
        fail(str(exc))
    except FileNotFoundError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        if tenancy is not None:
            tenancy.dispose()


def confirm(question: str, *, yes: bool) -> None:
    """Ask ``question`` on a terminal; without one, or on "no", exit 4 (``--yes`` skips it)."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{question} Refused: no terminal to confirm on; pass --yes.", EXIT_REFUSED)
    if not typer.confirm(question, default=False):
        fail("not confirmed; nothing was changed.", EXIT_REFUSED)


def tenant_record(tenant: Tenant, heads: Sequence[str] | None = None) -> dict[str, Any]:
    """A tenant as the JSON of every command prints it."""
    record: dict[str, Any] = {
        "id": str(tenant.id),
        "slug": tenant.slug,
        "name": tenant.name,
        "placement": tenant.placement,
        "status": tenant.status,
        "is_default": tenant.is_default,
        "created_at": tenant.created_at.isoformat(),
        "revision": tenant.revision,
        "location": tenant.location,
    }
    if heads is not None:
        record["at_head"] = tenant.revision in heads
    return record


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (dates as ISO 8601)."""

    def default(obj: object) -> object:
        if isinstance(obj, datetime):
            return obj.isoformat()
        return str(obj)

    typer.echo(json.dumps(value, indent=2, default=default))


def print_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str = ""
) -> None:
    """A rich table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not rows and empty:
        console.print(empty, markup=False, highlight=False)
        return
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:  # Text: names and errors are shown as they are, never read as markup
        table.add_row(*(Text("" if v is None else str(v)) for v in row))
    console.print(table)


def tenant_rows(tenants: Sequence[Tenant]) -> list[list[object]]:
    return [
        [
            t.slug + (" (default)" if t.is_default else ""),
            t.name,
            t.placement,
            t.status,
            t.revision or "",
            t.created_at.strftime("%Y-%m-%d %H:%M"),
        ]
        for t in tenants
    ]


TENANT_COLUMNS = ("slug", "name", "placement", "status", "revision", "created")


def split_list(values: Sequence[str] | None) -> list[str] | None:
    """Repeated options and comma lists as one list (no normalisation: references are canonical)."""
    items = [t for item in values or [] for t in item.split(",") if t]
    return items or None
