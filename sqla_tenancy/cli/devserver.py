"""``sqla-tenancy dev-server``: a PostgreSQL for development that outlives one process."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import EXIT_USAGE, JsonOption, app
from ._project import fail, print_json


@app.command("dev-server")
def dev_server(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the data and the passwords live (created on first start).")
    ] = Path(".sqla-tenancy"),
    port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="TCP port on 127.0.0.1 (default: the last one used, else 5433)."),
    ] = None,
    database: Annotated[str, typer.Option(help="The main database's name (first start only).")] = "app",
    print_env: Annotated[
        bool,
        typer.Option("--print-env", help="Print the export line of the server in --dir and exit."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Run a local PostgreSQL with the roles the docs set up, until Ctrl-C.

    The first start creates the cluster in --dir, the admin role app_admin, the application
    role app_user and the database, exactly as docs/quickstart.md does; later starts reuse them.
    It prints APP_URL, ADMIN_URL and SUPERUSER_URL and a line to paste into other shells.
    """
    from ..testing.cluster import ClusterError
    from ..testing.devserver import DevServer

    server = DevServer(directory, port=port, database=database)
    if print_env:
        known = server.credentials()
        if known is None:
            fail(f"no dev server in {directory}: start one with `sqla-tenancy dev-server`.", EXIT_USAGE)
        if as_json:
            print_json(known.environment())
        else:
            typer.echo(known.export_line())
        return
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            credentials = server.start()
        except ClusterError as exc:
            fail(str(exc).splitlines()[0] if "\n" in str(exc) else str(exc))
        try:
            if as_json:
                print_json({**credentials.environment(), "directory": str(server.directory)})
            else:
                typer.echo(
                    f"PostgreSQL is ready on 127.0.0.1:{credentials.port} "
                    f"(data in {directory}; Ctrl-C stops it, the data stays)"
                )
                for key, value in credentials.environment().items():
                    typer.echo(f"  {key}={value}")
                typer.echo("In another shell:")
                typer.echo(f"  {credentials.export_line()}")
            while not stop.wait(1.0):
                if not server.is_running():
                    fail(f"the PostgreSQL server stopped on its own; see {directory / 'server.log'}.")
        finally:
            server.stop()
            if not as_json:
                typer.echo("dev server stopped; the data stays for the next start.")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
