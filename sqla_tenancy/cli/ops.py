"""``sqla-tenancy doctor``, ``sqla-tenancy sql`` and ``sqla-tenancy audit``: day-2 operations.

``sqla-tenancy doctor [--json]``
    audit the live databases against the isolation model (:meth:`Tenancy.doctor`); exit 1 when
    there is an error-level finding.
``sqla-tenancy sql --tenant acme -f script.sql``
    run a script in the tenant's sandbox (:meth:`Tenancy.run_sql`), print each statement's
    result; exit 1 when it failed or was refused (nothing of it is then committed).
``sqla-tenancy audit [--tenant acme] [--since 2026-01-01T00:00] [--json]``
    the audit trail of platform writes (:meth:`Tenancy.audit_log`), newest first.

The application's Tenancy comes from ``--app module:attribute`` or ``$SQLA_TENANCY_APP``.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ._app import EXIT_USAGE, AppOption, app

if TYPE_CHECKING:
    from ..tenancy import Tenancy

__all__ = ["audit", "doctor", "parse_since", "sql"]


def _tenancy(app_spec: str | None) -> Tenancy:
    from alembic_ext import MigrationError, load_app

    try:
        return load_app(app_spec)
    except MigrationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


@app.command()
def doctor(
    app_spec: AppOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Audit the databases against the isolation model; exit 1 on any error-level finding."""
    from ..doctor import findings_json

    tenancy = _tenancy(app_spec)
    try:
        findings = tenancy.doctor()
    finally:
        tenancy.dispose()
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
    timeout: Annotated[float, typer.Option(help="Seconds the whole script may run.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Run a SQL script as one tenant, in its sandbox, in one transaction."""
    from ..errors import TenancyError

    script = sys.stdin.read() if str(file) == "-" else _read(file)
    tenancy = _tenancy(app_spec)
    try:
        results = tenancy.run_sql(tenant, script, timeout=timeout)
    except TenancyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - the database's error, one line, rolled back
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        typer.echo(f"error: {type(exc).__name__}: {message} (rolled back)", err=True)
        raise typer.Exit(1) from None
    finally:
        tenancy.dispose()
    if as_json:
        payload = [
            {
                "status": r.status,
                "columns": list(r.columns),
                "rows": [list(map(_plain, row)) for row in r.rows],
            }
            for r in results
        ]
        typer.echo(json.dumps(payload, indent=2))
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


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """The audit trail of platform writes, newest first."""
    from ..errors import TenancyError

    start = parse_since(since) if since else None
    tenancy = _tenancy(app_spec)
    try:
        entries = tenancy.audit_log(tenant=tenant, since=start, limit=limit)
    except TenancyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        tenancy.dispose()
    if as_json:
        typer.echo(json.dumps([{k: _plain(v) for k, v in vars(e).items()} for e in entries], indent=2))
        return
    for e in entries:
        who = e.tenant or (str(e.tenant_id) if e.tenant_id else "-")
        typer.echo(
            f"{e.at.isoformat(timespec='seconds')}  {who:<16} {e.operation:<6} {e.table:<28} "
            f"{e.rows:>6} rows  tx {e.transaction_id}  {e.actor}  {e.reason or '(no reason)'}"
        )
