"""``sqla-tenancy doctor``, ``sqla-tenancy sql`` and ``sqla-tenancy audit``: day-2 operations.

``sqla-tenancy doctor [--json]``
    audit the live databases against the isolation model (:meth:`Tenancy.doctor`); exit 1 when
    there is an error-level finding.
``sqla-tenancy sql --tenant acme -f script.sql``
    run a script in the tenant's sandbox (:meth:`Tenancy.run_sql`), print each statement's
    result; exit 1 when it failed or was refused (nothing of it is then committed).
``sqla-tenancy audit [--tenant acme] [--since 2026-01-01T00:00] [--json]``
    the audit trail of platform writes (:meth:`Tenancy.audit_log`), newest first.

The application's Tenancy is found as for every command (see :mod:`sqla_tenancy.cli._project`).
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import EXIT_USAGE, AppOption, ConfigOption, JsonOption, app
from ._project import fail, load_tenancy, operation, print_json

__all__ = ["audit", "doctor", "parse_since", "sql"]


@app.command()
def doctor(
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """Audit the databases against the isolation model; exit 1 on any error-level finding."""
    from ..doctor import findings_json

    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        findings = tenancy.doctor()
    if as_json:
        typer.echo(findings_json(findings))
    elif not findings:
        typer.echo("no findings: the databases match the isolation model")
    else:
        for finding in findings:
            typer.echo(f"{finding.severity.upper()} [{finding.check}] {finding.object}")
            typer.echo(f"    {finding.problem}")
            typer.echo(f"    fix: {finding.fix}")
        errors = sum(f.severity == "error" for f in findings)
        typer.echo(f"{errors} error(s), {len(findings) - errors} warning(s)")
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(1)


@app.command()
def sql(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant the script runs as.")],
    file: Annotated[Path, typer.Option("--file", "-f", help="The SQL script ('-': standard input).")],
    app_spec: AppOption = None,
    config: ConfigOption = Path("alembic.ini"),
    timeout: Annotated[float, typer.Option(help="Seconds the whole script may run.")] = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Run a SQL script as one tenant, in its sandbox, in one transaction."""
    import psycopg

    script = sys.stdin.read() if str(file) == "-" else _read(file)
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        try:
            results = tenancy.run_sql(tenant, script, timeout=timeout)
        except psycopg.Error as exc:  # the database's error, one line; nothing was committed
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(f"{type(exc).__name__}: {message} (rolled back)")
    if as_json:
        print_json([{"status": r.status, "columns": list(r.columns), "rows": r.rows} for r in results])
        return
    for result in results:
        if result.columns:
            typer.echo("\t".join(result.columns))
            for row in result.rows:
                typer.echo("\t".join("" if v is None else str(v) for v in row))
        typer.echo(result.status)


def _read(file: Path) -> str:
    try:
        return file.read_text()
    except OSError as exc:
        typer.echo(f"error: cannot read {file}: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """``--since``: an ISO date or time (UTC unless it says otherwise), or a duration back from
    now: ``30m``, ``12h``, ``7d``."""
    now = now or datetime.now(timezone.utc)
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if value and value[-1] in units and value[:-1].isdigit():
        return now - timedelta(**{units[value[-1]]: int(value[:-1])})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither an ISO date/time (2026-01-31, 2026-01-31T12:00) nor a duration (12h, 7d)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@app.command()
def audit(
    app_spec: AppOption = None,
    tenant: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at runtime
        typer.Option("--tenant", "-t", help="Only writes to this tenant's rows."),
    ] = None,
    since: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="From this time on: ISO date/time, or 30m, 12h, 7d back from now."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many entries.")] = 1000,
    config: ConfigOption = Path("alembic.ini"),
    as_json: JsonOption = False,
) -> None:
    """The audit trail of platform writes, newest first."""
    start = parse_since(since) if since else None
    tenancy = load_tenancy(app_spec, config)
    with operation(tenancy):
        entries = tenancy.audit_log(tenant=tenant, since=start, limit=limit)
    if as_json:
        print_json([vars(e) for e in entries])
        return
    for e in entries:
        who = e.tenant or (str(e.tenant_id) if e.tenant_id else "-")
        typer.echo(
            f"{e.at.isoformat(timespec='seconds')}  {who:<16} {e.operation:<6} {e.table:<28} "
            f"{e.rows:>6} rows  tx {e.transaction_id}  {e.actor}  {e.reason or '(no reason)'}"
        )
