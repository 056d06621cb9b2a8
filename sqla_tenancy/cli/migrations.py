"""``sqla-tenancy init`` and ``sqla-tenancy migrate``.

``sqla-tenancy init``
    create ``alembic.ini`` and a migrations directory with both streams.
``sqla-tenancy migrate``
    upgrade the infrastructure, then every tenant location behind head, in parallel processes,
    with a progress bar, a summary, an optional JSON report and a non-zero exit when a tenant
    failed. The application's Tenancy comes from ``--app module:attribute`` or
    ``$SQLA_TENANCY_APP``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from rich.console import Console

from ._app import EXIT_LOCKED, EXIT_USAGE, AppOption, ConfigOption, app
from ._project import split_list


@app.command()
def init(
    directory: Annotated[str, typer.Argument(help="The migrations directory to create.")] = "migrations",
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
) -> None:
    """Create alembic.ini and a migrations directory with the infrastructure and tenant streams."""
    from alembic_ext import MigrationError, init_project

    try:
        written = init_project(directory, app=app_spec, ini=config)
    except MigrationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    for path in written:
        typer.echo(f"created {path}")
    typer.echo(
        f"next: `alembic -c {config} upgrade head`, then "
        f"`alembic -c {config} revision --autogenerate -m initial`"
    )


@app.command()
def migrate(
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes.")] = 1,
    revision: Annotated[str, typer.Option(help="Target revision of the tenant stream.")] = "head",
    tenant: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--tenant", "-t", help="Only these tenants (repeat, or a comma list)."),
    ] = None,
    stream: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Only one stream: infrastructure or tenant."),
    ] = None,
    continue_on_error: Annotated[
        bool, typer.Option("--continue-on-error", help="Go on past failing tenants.")
    ] = False,
    canary: Annotated[
        int, typer.Option(min=0, help="Migrate this many tenants first; stop if one fails.")
    ] = 0,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for a running migration instead of exiting.")
    ] = False,
    report: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write the per-tenant report as JSON here."),
    ] = None,
    progress: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    ] = None,
) -> None:
    """Upgrade the infrastructure, then every tenant location that is behind."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from alembic_ext import MigrationError, MigrationLocked, migrate_fleet
    from alembic_ext.versions import INFRASTRUCTURE, STREAMS, TENANT

    from ..errors import TenancyError

    console = Console(stderr=True)
    streams: tuple[str, ...] = STREAMS
    if stream is not None:
        if stream not in STREAMS:
            typer.echo(f"error: --stream must be {INFRASTRUCTURE} or {TENANT}", err=True)
            raise typer.Exit(EXIT_USAGE)
        streams = (stream,)
    only = split_list(tenant)  # canonical references only: no stripping, as everywhere
    show = console.is_terminal if progress is None else progress
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[failed]} failed"),
        console=console,
        disable=not show,
    )
    task = bar.add_task("tenants", total=None, failed=0)
    failures = 0

    def planned(count: int) -> None:
        bar.update(task, total=count)

    def done(outcome: object) -> None:
        nonlocal failures
        failures += getattr(outcome, "status", "") == "failed"
        bar.update(task, advance=1, failed=failures)

    try:
        with bar:
            result = migrate_fleet(
                app_spec or "",
                config,
                jobs=jobs,
                revision=revision,
                streams=streams,
                tenants=only,
                continue_on_error=continue_on_error,
                canary=canary,
                wait_for_lock=wait,
                report_path=report,
                on_outcome=done,
                on_plan=planned,
            )
    except MigrationLocked as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_LOCKED) from None
    except (MigrationError, TenancyError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    _summary(console, result)
    if report is not None:
        console.print(f"report written to {report}")
    if not result.ok:
        raise typer.Exit(1)


def _summary(console: Console, result: object) -> None:
    from rich.table import Table
    from rich.text import Text

    from alembic_ext import FleetReport

    assert isinstance(result, FleetReport)
    counts = result.counts()
    infra = result.infrastructure
    if infra is not None:
        console.print(
            f"infrastructure: {infra.status} ({infra.before or 'base'} -> {infra.after or 'base'})"
            + (
                f"; foreign tables refreshed in {result.refreshed_foreign_schemas} tenant(s)"
                if result.refreshed_foreign_schemas
                else ""
            )
        )
    console.print(
        f"tenant stream -> {result.target}: {counts['upgraded']} upgraded, {counts['unchanged']} unchanged, "
        f"{counts['skipped_at_target']} already there (not connected), {counts['failed']} failed, "
        f"{counts['not_run']} not run; {result.seconds:.1f} s with {result.jobs} job(s)"
    )
    if result.failed:
        table = Table("location", "kind", "revision", "error", title="failed")
        for outcome in result.failed:
            table.add_row(
                *(
                    Text(v)
                    for v in (outcome.location, outcome.kind, outcome.before or "base", outcome.error or "")
                )
            )
        console.print(table)
    if result.stopped:
        console.print(f"stopped: {result.stopped}", markup=False)
