"""``sqla-tenancy check-isolation``: run the isolation checker on the application's database.

It creates two throwaway tenants per placement (and rows in them), probes them and deletes them:
point it at a development or CI database, never at production.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._app import EXIT_USAGE, AppOption, app


@app.command("check-isolation")
def check_isolation(
    app_spec: AppOption = None,
    placement: Annotated[
        Optional[list[str]],  # noqa: UP045 - typer reads the annotation at runtime
        typer.Option("--placement", "-p", help="Only these placements (repeat); default: all three."),
    ] = None,
    model: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--model", "-m", help="Only these tables (repeat; e.g. projects, auth.users)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Prove that tenants cannot reach each other's rows (exit code 1 on a finding).

    Creates two tenants per placement, probes reads, counts, writes, keys,
    pooled connections, queries with no tenant and the catalog, then deletes
    them again. Run it against a development or CI database.
    """
    from alembic_ext import MigrationError
    from alembic_ext.fleet import load_app
    from sqla_tenancy.errors import TenancyError
    from sqla_tenancy.testing.isolation import ALL_PLACEMENTS, check_tenant_isolation

    try:
        tenancy = load_app(app_spec)
    except MigrationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    try:
        tables = None
        if model:
            known = tenancy.metadata.tables
            missing = [m for m in model if m not in known]
            if missing:
                typer.echo(
                    f"error: no table {', '.join(missing)} in the application's metadata "
                    f"(known: {', '.join(sorted(known))})",
                    err=True,
                )
                raise typer.Exit(EXIT_USAGE)
            tables = [known[m] for m in model]
        report = check_tenant_isolation(tenancy, tables, placement or ALL_PLACEMENTS)
    except TenancyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    finally:
        tenancy.dispose()
    if as_json:
        typer.echo(report.to_json())
    else:
        typer.echo(report.summary() if report.findings else f"ok: {report.checks} checks, no finding")
        for skipped in report.skipped:
            typer.echo(f"  skipped: {skipped}")
    if not report.ok:
        raise typer.Exit(1)
